"""The teacher in llama.cpp: its vocabulary checked against the student's, its responses to prompts
without one, and its top-k log-probabilities at every response token.

The student's tokenizer (with the run's chat template) makes every token id; the teacher is handed
ids, never text, so both sides see the same tokens by construction once the vocabularies match.
"""

import re
import time
from pathlib import Path
from typing import Any

from edgetune import models
from edgetune.constants import IGNORE
from edgetune.errors import EdgetuneError

PADDING = re.compile(r"^(\[PAD\d*\]|<pad\d*>|<unused\d+>|<\|reserved_special_token_\d+\|>)$")


def teacher_file(ref: str, cache_dir: str | None) -> Path:
    """The GGUF file of `--teacher`: a .gguf file or a built-in model."""
    if ref in models.BUILTIN:
        return models.builtin_gguf(ref, cache_dir)
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        raise EdgetuneError(f"teacher {ref} is a folder: the teacher runs in llama.cpp, so export it "
                            f"first (edgetune export {ref} --gguf q8_0) and pass the .gguf file")
    if path.exists():
        raise EdgetuneError(f"teacher {ref} is not a .gguf file")
    raise EdgetuneError(f"teacher {ref} does not exist: pass a .gguf file or a built-in model "
                        f"({', '.join(models.BUILTIN)})")


def gguf_tokens(path: Path) -> list[str]:
    """The vocabulary stored in a GGUF file, by id."""
    field = models.read_gguf(path).get_field("tokenizer.ggml.tokens")
    if field is None:
        raise EdgetuneError(f"teacher {path.name} has no tokenizer.ggml.tokens: not a model GGUF")
    return [str(t) for t in field.contents()]


def check_vocab(path: Path, tokenizer: Any, student_rows: int, student: str) -> int:
    """The teacher's vocabulary size, after checking it is the student's (same tokens, same ids)."""
    teacher = gguf_tokens(path)
    mine = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    differ = next((i for i, (a, b) in enumerate(zip(teacher, mine)) if a != b), None)
    # a vocabulary padded to a round size (rows the student has too) holds no real token
    padding = all(PADDING.match(t) for t in teacher[len(mine):]) and len(teacher) <= student_rows
    if differ is not None or len(teacher) < len(mine) or not padding:
        where = (f"token {differ} is {teacher[differ]!r} in the teacher, {mine[differ]!r} in the "
                 f"student" if differ is not None else
                 f"{len(teacher)} tokens in the teacher, {len(mine)} in the student")
        raise EdgetuneError(f"teacher {path.name} and student {student} do not share a tokenizer "
                            f"({where}); distillation needs the same vocabulary and ids")
    return len(teacher)


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, dynamic_ncols=True, desc=desc,
                disable=not enabled)


def respond(llm: Any, prompts: list[list[int]], stops: list[int], sampling: dict,
            progress: bool) -> list[list[int]]:
    """The teacher's response tokens to each prompt (ids), greedy or sampled per `sampling`."""
    llm.set_seed(sampling["seed"])
    greedy = sampling["temperature"] == 0
    answers = []
    with _bar(len(prompts), "teacher writes", progress) as bar:
        bar.unit = "prompt"
        for ids in prompts:
            out: list[int] = []
            tokens = llm.generate(ids, temp=sampling["temperature"], top_p=sampling["top_p"],
                                  top_k=1 if greedy else 0, min_p=0.0, reset=True)
            for token in tokens:
                if token in stops or len(out) >= sampling["max_new_tokens"]:
                    break
                out.append(int(token))
            answers.append(out)
            bar.update(1)
    return answers


def response_positions(input_ids: list[int], labels: list[int]) -> list[int]:
    """Positions whose next token is a response token: where the teacher's distribution is wanted."""
    return [i for i in range(len(input_ids) - 1) if labels[i + 1] != IGNORE]


def top_k(llm: Any, examples: list, k: int, progress: bool) -> tuple[dict, dict]:
    """The teacher's top-k ids and log-probabilities at every response position of `examples`,
    concatenated in order ({"ids", "logprobs", "counts"}), and the pass's timing."""
    import numpy as np

    ids, logprobs, counts = [], [], []
    total = sum(len(e.input_ids) for e in examples)
    started = time.perf_counter()
    with _bar(total, "teacher top-k", progress) as bar:
        for example in examples:
            positions = response_positions(example.input_ids, example.labels)
            llm.reset()
            llm.eval(example.input_ids[:positions[-1] + 1])
            logits = np.asarray(llm.scores[positions], dtype=np.float32)
            top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
            picked = np.take_along_axis(logits, top, axis=1)
            order = np.argsort(-picked, axis=1)  # highest first, so a row reads as a ranking
            top, picked = np.take_along_axis(top, order, 1), np.take_along_axis(picked, order, 1)
            peak = logits.max(axis=1, keepdims=True)
            lse = peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))
            ids.append(top.astype(np.int32))
            logprobs.append((picked - lse).astype(np.float32))
            counts.append(len(positions))
            bar.update(len(example.input_ids))
    seconds = time.perf_counter() - started
    arrays = {"ids": np.concatenate(ids), "logprobs": np.concatenate(logprobs),
              "counts": np.array(counts, dtype=np.int64)}
    return arrays, {"seconds": round(seconds, 2), "tokens": total,
                    "tokens_per_s": round(total / seconds, 1) if seconds else None}
