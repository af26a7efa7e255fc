"""edgetune's trainer against transformers.Trainer + PEFT: tokens/s, peak RSS, FLOP/s, eval loss.

    python benchmarks/train_speed.py [--models smollm2-135m,qwen2.5-0.5b] [--repeats 3]

Both sides train the same model, LoRA config and seed on the same examples in the same order (the
Trainer is fed the exact token ids and labels edgetune builds, batched the same way, padded by a
collator), with the same optimizer, schedule and clipping, in the dtype this CPU runs natively (fp32
without AVX512-BF16). Each run is a fresh process: peak RSS is its maximum resident set (wait4).
Runs alternate between the sides and repeat; the table shows medians and min-max spread, because the
machine is shared. tokens/s counts real (non-pad) tokens over the optimizer steps after the first
--warmup ones: while the C heap grows to its working size a step also pays for fresh pages (on the
Qwen2.5-0.5B shape, ~370k page faults in each of the first two steps, none after), which a real
run of hundreds of steps pays once.
Eval loss is computed the same way for both trained adapters (mean token loss on held-out records).

On a machine shared with other jobs, pass --threads 1: with one torch thread per core and more
runnable processes than cores, every parallel region waits for a descheduled thread (an elementwise
op measured 0.6 ms with one thread, 9-32 ms with two, under a load of 9 on 2 cores).
"""

import argparse
import importlib
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median, model_dir  # noqa: E402

SIDES = ("edgetune", "transformers")
MODULES = ["json", "os", "re", "collections", "itertools", "functools", "pathlib", "subprocess",
           "random", "statistics", "textwrap", "string", "shutil", "argparse", "datetime", "heapq",
           "csv", "dataclasses", "typing", "io", "threading", "socket", "zipfile", "tarfile",
           "difflib", "fractions", "decimal", "enum", "inspect", "tempfile", "logging", "pickle",
           "contextlib", "glob", "calendar", "uuid", "sqlite3", "gzip", "urllib.parse"]


def docstring_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca records with real English responses of varied length: stdlib docstrings."""
    records, seen = [], set()
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not attr.startswith("_") else None
            if doc and len(doc) >= 80 and doc not in seen:
                seen.add(doc)
                records.append({"instruction": f"Explain what `{name}.{attr}` does in Python.",
                                "input": "", "output": doc[:1800]})
    random.Random(seed).shuffle(records)
    return records[:n]


# ---- FLOPs --------------------------------------------------------------------------------------

def flops_per_step(config: dict, lengths: list[int], labelled: int, rank: int) -> float:
    """Useful FLOPs of one LoRA step over sequences of `lengths` with `labelled` label tokens.

    Frozen linear layers: forward 2P and input gradient 2P per token (no weight gradient). LoRA:
    forward 2r(in+out), backward 4r(in+out) per token and module. Causal attention: QK^T and AV over
    the lower triangle, backward twice the forward. Output layer: forward and hidden-state gradient
    at labelled positions only (no other position needs logits). Padding and elementwise work are
    not counted, so a side that computes more than this gets no credit for it.
    """
    d, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or d // heads
    shapes = [(d, heads * head_dim), (d, kv * head_dim), (d, kv * head_dim),
              (heads * head_dim, d), (d, ffn), (d, ffn), (ffn, d)]
    params = sum(i * o for i, o in shapes)
    lora = sum(rank * (i + o) for i, o in shapes)
    tokens = sum(lengths)
    linear = layers * tokens * (4 * params + 6 * lora)
    attention = layers * 3 * sum(4 * heads * head_dim * n * (n + 1) / 2 for n in lengths)
    head = labelled * 4 * d * config["vocab_size"]
    return linear + attention + head


def matmul_peak(dtype_name: str, m: int, k: int, n: int, repeats: int = 5) -> float:
    """Best FLOP/s of an (m x k) @ (k x n) matmul in this process's thread setting."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * m * k * n / best


# ---- the two sides, each in its own process ------------------------------------------------------

def child_edgetune(spec: dict) -> dict:
    from edgetune.train.command import train
    from edgetune.train.config import TrainConfig

    s = spec["settings"]
    summary = train(TrainConfig(
        model=spec["model"], data=spec["train_file"], eval_data=spec["eval_file"],
        output=spec["out"], force=True, steps=s["steps"], batch_size=s["batch"],
        seq_len=s["seq_len"], rank=s["rank"], alpha=s["alpha"], lr=s["lr"], warmup=0.0,
        dtype="fp32", eval_every=s["steps"], save_every=0, progress=False, seed=s["seed"],
        threads=s["threads"], template=spec["template"]))
    seconds = [n / r["tokens_per_s"] for n, r in zip(spec["step_counts"], summary.history)]
    return {"seconds": seconds, "eval_loss": summary.eval_loss}


def child_transformers(spec: dict) -> dict:
    """The tutorial path: from_pretrained, get_peft_model, Trainer(use_cpu=True)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    s = spec["settings"]
    torch.set_num_threads(s["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    torch.manual_seed(s["seed"])
    model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in spec["train_rows"]]

    def collate(batch: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in batch)
        pad = lambda seq, v: list(seq) + [v] * (width - len(seq))  # noqa: E731
        return {"input_ids": torch.tensor([pad(r["input_ids"], spec["pad_id"]) for r in batch]),
                "labels": torch.tensor([pad(r["labels"], -100) for r in batch]),
                "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in batch])}

    class InOrder(Trainer):  # the rows are already in edgetune's order
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class Timer(TrainerCallback):
        seconds: list = []

        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    args = TrainingArguments(
        output_dir=spec["out"], use_cpu=True, per_device_train_batch_size=s["batch"],
        max_steps=s["steps"], learning_rate=s["lr"], lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1,
        save_strategy="no", report_to=[], remove_unused_columns=False, seed=s["seed"],
        dataloader_num_workers=0, disable_tqdm=True)
    timer = Timer()
    InOrder(model=model, args=args, train_dataset=rows, data_collator=collate,
            callbacks=[timer]).train()
    return {"seconds": timer.seconds, "eval_loss": _plain_eval_loss(model, spec["eval_rows"])}


def _plain_eval_loss(model, rows: list) -> float:
    """Mean token loss over held-out rows, one at a time (full logits, F.cross_entropy)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in rows:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            targets = torch.tensor(labels[1:])
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    return total / count


# ---- the parent: data, interleaved runs, table ----------------------------------------------------

def prepare(model: Path, work: Path, settings: dict) -> dict:
    """Write the data and the exact per-step token rows both sides will see."""
    from transformers import AutoTokenizer

    from edgetune.train.data import SEGMENTS, Batches, encode, fit_to_length

    records = docstring_records(376)
    train_file, eval_file = work / "train.jsonl", work / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in records[:360]))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in records[360:]))
    tokenizer = AutoTokenizer.from_pretrained(model)
    template = None
    if not tokenizer.chat_template:  # a base model: both sides get edgetune's default template
        from edgetune import templates

        template = templates.default_for(tokenizer.get_vocab())
        tokenizer.chat_template = templates.TEMPLATES[template].jinja
    seq_len = settings["seq_len"]
    train = fit_to_length(encode(tokenizer, "alpaca", records[:360]), seq_len, "train")
    held = fit_to_length(encode(tokenizer, "alpaca", records[360:]), seq_len, "eval")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = Batches(train, settings["batch"], settings["seed"], pad_id)
    steps, rows = [], []
    for _ in range(settings["steps"]):
        packed = batches.next()
        bounds, ids, labels = packed[SEGMENTS], packed["input_ids"][0], packed["labels"][0]
        for a, b in zip(bounds[:-1], bounds[1:]):
            rows.append((ids[a:b].tolist(), labels[a:b].tolist()))
        steps.append([(b - a, int((labels[a + 1:b] != -100).sum()))
                      for a, b in zip(bounds[:-1], bounds[1:])])
    return {"model": str(model), "train_file": str(train_file), "eval_file": str(eval_file),
            "settings": settings, "pad_id": pad_id, "train_rows": rows, "template": template,
            "eval_rows": [(e.input_ids, e.labels) for e in held],
            "step_counts": [sum(n for n, _ in s) for s in steps], "steps": steps}


def run_child(side: str, spec_file: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", side, "--spec", str(spec_file),
               "--result", str(out)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    output = child.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{side} run failed:\n{output[-3000:]}")
    result = json.loads(out.read_text())
    result["peak_rss"] = usage.ru_maxrss * 1024
    return result


def measure(name: str, model: Path, work: Path, settings: dict, repeats: int) -> dict:
    spec = prepare(model, work, settings)
    spec_file = work / "spec.json"
    spec["out"] = str(work / "run")
    spec_file.write_text(json.dumps(spec))
    config = json.loads((model / "config.json").read_text())
    warmup = settings["warmup"]
    timed = spec["steps"][warmup:]
    tokens = sum(n for step in timed for n, _ in step)
    flops = sum(flops_per_step(config, [n for n, _ in step], sum(k for _, k in step),
                               settings["rank"]) for step in timed)
    results = {side: {"tokens_per_s": [], "peak_rss": [], "eval_loss": [], "flops": []}
               for side in SIDES}
    results["fp32 peak"] = []
    d, ffn = config["hidden_size"], config["intermediate_size"]
    for rep in range(repeats):
        # The peak is measured between runs, in the same conditions, on a shape the model uses.
        results["fp32 peak"].append(matmul_peak("float32", 512, d, ffn))
        for side in (SIDES if rep % 2 == 0 else SIDES[::-1]):
            r = run_child(side, spec_file, work / f"{side}.json")
            seconds = sum(r["seconds"][warmup:])
            entry = results[side]
            entry["tokens_per_s"].append(tokens / seconds)
            entry["flops"].append(flops / seconds)
            entry["peak_rss"].append(r["peak_rss"])
            entry["eval_loss"].append(r["eval_loss"])
            print(f"  {name} rep {rep} {side}: {tokens / seconds:.1f} tok/s, "
                  f"{r['peak_rss'] / 2**30:.2f} GiB, eval loss {r['eval_loss']:.4f}", flush=True)
    results["per_token_flops"] = flops / tokens
    results["padding"] = 1 - tokens / sum(max(n for n, _ in s) * len(s) for s in timed)
    return results


def spread(values: list[float], fmt: str = ".1f") -> str:
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


def print_table(title: str, results: dict, bf16_peak: float) -> None:
    e, t = results["edgetune"], results["transformers"]
    # Against the best peak seen: load from other jobs lowers it, so the median can flatter.
    peak = max(results["fp32 peak"])
    print(f"\n{title}")
    print(f"{'':<14}{'tok/s med':>10}{'spread':>14}{'peak RSS GiB':>14}{'eval loss':>11}"
          f"{'GFLOP/s':>9}{'% fp32 peak':>12}")
    for side, entry in (("edgetune", e), ("transformers", t)):
        rss = [v / 2**30 for v in entry["peak_rss"]]
        gf = median(entry["flops"]) / 1e9
        print(f"{side:<14}{median(entry['tokens_per_s']):>10.1f}{spread(entry['tokens_per_s']):>14}"
              f"{median(rss):>8.2f} ({spread(rss, '.2f')}){median(entry['eval_loss']):>9.4f}"
              f"{gf:>9.1f}{100 * gf * 1e9 / peak:>11.0f}%")
    speedup = median(e["tokens_per_s"]) / median(t["tokens_per_s"])
    print(f"ratios edgetune/transformers: tokens/s {speedup:.2f}, "
          f"peak RSS {median(e['peak_rss']) / median(t['peak_rss']):.2f}, "
          f"eval loss {median(e['eval_loss']) / median(t['eval_loss']):.4f}")
    print(f"useful work {results['per_token_flops'] / 1e9:.2f} GFLOP/token; padding in the "
          f"reference batches {results['padding']:.0%}; measured matmul peak fp32 "
          f"{peak / 1e9:.1f} GFLOP/s (best of {spread([p / 1e9 for p in results['fp32 peak']])}), "
          f"bf16 {bf16_peak / 1e9:.1f} GFLOP/s (no AVX512-BF16: not used)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: torch's, one per core)")
    parser.add_argument("--steps", default="6,5", help="optimizer steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="leading steps left untimed")
    parser.add_argument("--batch", default="4,4", help="examples per step per model")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--work", default=None)
    parser.add_argument("--child", choices=SIDES)
    parser.add_argument("--spec")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        run = child_edgetune if args.child == "edgetune" else child_transformers
        Path(args.result).write_text(json.dumps(run(spec)))
        return
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="edgetune-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, fp32 on both sides")
    bf16_peak = matmul_peak("bfloat16", 256, 256, 256, repeats=2)
    steps, batches = args.steps.split(","), args.batch.split(",")
    for i, name in enumerate(args.models.split(",")):
        model = model_dir(name, work)
        settings = dict(batch=int(batches[i]), steps=int(steps[i]), seq_len=args.seq_len, rank=16,
                        alpha=32.0, lr=2e-4, seed=0, threads=threads, warmup=args.warmup)
        print(f"{name}: batch {settings['batch']}, {settings['steps']} steps, "
              f"{args.repeats} repeats", flush=True)
        (work / f"{name}-runs").mkdir(exist_ok=True)
        results = measure(name, model, work / f"{name}-runs", settings, args.repeats)
        print_table(f"{name} (batch {settings['batch']}, seq-len <= {settings['seq_len']}, "
                    f"rank 16 all-linear, {threads} threads, {settings['steps'] - args.warmup} timed steps)",
                    results, bf16_peak)


if __name__ == "__main__":
    main()
