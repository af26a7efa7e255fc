"""`edgetune distill`: the teacher's work (cached), then the student trained through `train`'s loop.

The teacher first writes the responses the prompts lack. In sequences mode those records are the
training data, trained on by cross-entropy exactly as `edgetune train` would train on the JSONL left
in the run folder. In logits mode the teacher also gives its top-k log-probabilities at every
response token, and the loss is edgetune.train.kd's. Both passes are cached (edgetune.distill.cache),
so a second run, or a resumed one, finds them without loading the teacher.
"""

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from edgetune import folders
from edgetune.errors import EdgetuneError
from edgetune.records import answered, prompt_messages, read_jsonl, with_answer
from edgetune.train.command import Supervised, load_examples
from edgetune.train.command import main as train_main
from edgetune.distill import cache
from edgetune.distill.config import DistillConfig

RESPONSES = "teacher_responses.jsonl"  # in the run folder: the data with the teacher's responses
RECORD = "distill.json"  # in the run folder: teacher, settings, cache entries and the pass's timing


def main(config: DistillConfig) -> int:
    task = Distill()
    status = train_main(config, task)
    if status == 0:
        task.leave_in(Path(config.output).expanduser(), config)
    return status


class Distill(Supervised):
    """Records whose answers may be missing, examples the teacher completed, and the KD loss."""

    verb = "distill"

    def __init__(self) -> None:
        self.llm: Any = None
        self.teacher: Path | None = None
        self.done: dict = {}  # what the teacher did (or the cache held), for distill.json

    def read_records(self, config: DistillConfig) -> dict:
        paths = [config.data] + ([config.eval_data] if config.eval_data else [])
        return {path: read_jsonl(path, prompts=True) for path in paths}

    def objective(self, config: DistillConfig) -> Callable:
        if config.mode == "sequences":
            return super().objective(config)
        from edgetune.train.kd import distill_loss

        return lambda model, batch: distill_loss(model, batch, config.kd_loss, config.ce_weight)

    def examples(self, config: DistillConfig, tokenizer: Any, records: dict, model_dir: Path) -> tuple:
        from edgetune.distill.teacher import check_vocab, teacher_file
        from edgetune.hf import read_config

        self.teacher = teacher_file(config.teacher, config.cache_dir)
        rows = read_config(model_dir).get("vocab_size") or len(tokenizer)
        n_vocab = check_vocab(self.teacher, tokenizer, rows, config.model)
        if config.top_k > n_vocab:
            raise EdgetuneError(f"--top-k {config.top_k} is larger than the teacher's vocabulary "
                                f"({n_vocab} tokens)")
        prompts = {path: _prompt_ids(path, config, tokenizer, fmt, rows)
                   for path, (fmt, rows) in records.items()}
        try:
            records = {path: self._complete(path, fmt, rows, prompts[path], config, tokenizer)
                       for path, (fmt, rows) in records.items()}
            train_set, eval_set = load_examples(config, tokenizer, records)
            if config.mode == "logits":
                train_set = self._with_top_k(train_set, config)
        finally:
            if self.llm is not None:
                self.llm.close()
                self.llm = None
        return train_set, eval_set

    def _teacher(self, config: DistillConfig) -> Any:
        from edgetune.export.llama import load_llama
        from edgetune.plan.teacher import teacher_memory
        from edgetune.shape import shape_from_gguf
        from edgetune.units import format_size, parse_size

        if self.llm is None:
            ctx = config.seq_len + config.max_new_tokens
            memory = teacher_memory(shape_from_gguf(self.teacher), self.teacher.stat().st_size, ctx)
            if config.ram and memory.total > parse_size(config.ram):
                raise EdgetuneError(f"the teacher {self.teacher.name} needs about "
                                    f"{format_size(memory.total)} in llama.cpp, more than --ram "
                                    f"{config.ram}; pass a smaller GGUF (q4_k_m) or a lower --seq-len")
            print(f"edgetune: loading the teacher {self.teacher.name} in llama.cpp: "
                  f"{memory.describe()}, released before the student loads", flush=True)
            self.llm = load_llama(self.teacher, n_ctx=ctx)
        return self.llm

    def _complete(self, path: str, fmt: str, rows: list[dict], prompts: list, config: DistillConfig,
                  tokenizer: Any) -> tuple[str, list[dict]]:
        """The records of `path` with the teacher's response wherever one is missing (cached)."""
        from edgetune.distill.teacher import respond
        from edgetune.models import content_key
        from edgetune.train.evaluate import stop_ids

        missing = [i for i, row in enumerate(rows) if not answered(row, fmt)]
        if not missing:
            return fmt, rows
        root, sampling = cache.folder(config.cache_dir), config.sampling()
        name = cache.key("responses", content_key(self.teacher), rows, [prompts[i] for i in missing],
                         sampling)
        found = cache.read(root, name, ".jsonl")
        if found is None:
            llm = self._teacher(config)
            stops = list(dict.fromkeys(stop_ids(tokenizer) + [llm.token_eos()]))
            started = time.perf_counter()
            answers = respond(llm, [prompts[i] for i in missing], stops, sampling, config.progress)
            seconds = round(time.perf_counter() - started, 2)
            print(f"edgetune: the teacher wrote {len(missing)} responses in {seconds:.1f} s", flush=True)
            done = list(rows)
            for i, ids in zip(missing, answers):
                done[i] = with_answer(rows[i], fmt, tokenizer.decode(ids, skip_special_tokens=True))
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done)
            meta = {"teacher": str(self.teacher), "data": str(path), "written": len(missing),
                    "sampling": sampling, "seconds": seconds}
            cache.write(root, name, ".jsonl", text.encode(), meta)
            found = cache.read(root, name, ".jsonl")
        else:
            print(f"edgetune: the teacher's responses to {path} come from the cache", flush=True)
        self.done.setdefault("responses", {})[str(path)] = {"entry": str(root / f"{name}.jsonl"),
                                                           "seconds": found[1].get("seconds")}
        return fmt, [json.loads(line) for line in found[0].decode().splitlines()]

    def _with_top_k(self, examples: list, config: DistillConfig) -> list:
        """`examples` carrying the teacher's top-k at their response tokens (cached)."""
        import dataclasses

        from edgetune.distill.teacher import top_k
        from edgetune.models import content_key

        root = cache.folder(config.cache_dir)
        name = cache.key("top-k", content_key(self.teacher), config.top_k,
                         [[e.input_ids, e.labels] for e in examples])
        found = cache.read(root, name, ".npz")
        if found is None:
            arrays, timing = top_k(self._teacher(config), examples, config.top_k, config.progress)
            meta = {"teacher": str(self.teacher), "top_k": config.top_k, "examples": len(examples),
                    **timing}
            cache.write(root, name, ".npz", cache.pack_arrays(arrays), meta)
            print(f"edgetune: teacher pass: {timing['tokens']} tokens in {timing['seconds']:.1f} s "
                  f"({timing['tokens_per_s']} tokens/s) on llama.cpp", flush=True)
        else:
            arrays, meta = cache.unpack_arrays(found[0]), found[1]
            print(f"edgetune: the teacher's top-{config.top_k} comes from the cache", flush=True)
        self.done["teacher_pass"] = {"entry": str(root / f"{name}.npz"),
                              **{k: meta.get(k) for k in ("seconds", "tokens", "tokens_per_s")}}
        ends = arrays["counts"].cumsum()
        return [dataclasses.replace(e, teacher=(arrays["ids"][end - n:end],
                                                arrays["logprobs"][end - n:end]))
                for e, n, end in zip(examples, arrays["counts"], ends)]

    def leave_in(self, run_dir: Path, config: DistillConfig) -> None:
        """Put the teacher's responses (JSONL that `edgetune train` takes as is) and a record of the
        distillation in the finished run folder."""
        responses = self.done.get("responses", {})
        if config.data in responses:
            tmp = run_dir / f".{RESPONSES}.tmp"
            with folders.disk_errors(run_dir, cleanup=[tmp]):
                shutil.copyfile(responses[config.data]["entry"], tmp)
                tmp.replace(run_dir / RESPONSES)
        record = {"teacher": str(self.teacher), "mode": config.mode, "top_k": config.top_k,
                  "loss": config.kd_loss, "ce_weight": config.ce_weight,
                  "sampling": config.sampling(), **self.done}
        folders.write_text_atomic(run_dir / RECORD, json.dumps(record, indent=2) + "\n")


def _prompt_ids(path: str, config: DistillConfig, tokenizer: Any, fmt: str,
                rows: list[dict]) -> list:
    """Each record's prompt as token ids; a prompt leaving no room for a response is refused."""
    from edgetune.train.data import render_ids

    if fmt == "text" or not getattr(tokenizer, "chat_template", None):
        return [None] * len(rows)  # text has no prompt; without a template, encode() says so
    found = []
    for number, row in enumerate(rows, 1):
        ids = render_ids(tokenizer, prompt_messages(row, fmt), generation_prompt=True)
        if len(ids) >= config.seq_len:
            raise EdgetuneError(f"{path}: record {number}: its prompt is {len(ids)} tokens, and "
                                f"--seq-len {config.seq_len} leaves no room for a response; raise "
                                f"--seq-len or shorten the prompt")
        found.append(ids)
    return found
