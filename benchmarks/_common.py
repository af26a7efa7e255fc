"""Shared benchmark plumbing: models with real shapes, fixed-length data, and measured child runs."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def smollm2_dir() -> Path:
    from edgetune import models

    return models.resolve("smollm2-135m")


def model_dir(name: str, root: Path) -> Path:
    """A built-in model (smollm2-135m, gemma3-270m) as it is, else a random one of `name`'s shape."""
    from edgetune import models

    return models.resolve(name) if name in models.BUILTIN else shaped_model(name, root)


def shaped_model(name: str, root: Path, layers: int | None = None) -> Path:
    """A random-initialised model with `name`'s exact shape (cut to `layers` decoder layers when
    given) and SmolLM2's tokenizer (ids fit), stored in bf16 safetensors."""
    folder = root / (name if layers is None else f"{name}-{layers}l")
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgetune.plan.catalogue import CATALOGUE

    shape = dict(CATALOGUE[name][1])  # the exact config.json numbers the planner uses
    if layers is not None:
        shape["num_hidden_layers"] = layers
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    source = smollm2_dir()
    for file in source.iterdir():
        if file.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(file, tmp / file.name)
    tmp.rename(folder)
    return folder


def full_length_text(path: Path, n: int, words: int) -> Path:
    """Plain-text records long enough to fill any --seq-len up to about `words` tokens."""
    sentence = "The quick brown fox jumps over the lazy dog while the small model learns. "
    text = (sentence * (words // 12 + 1)).strip()
    path.write_text("".join(json.dumps({"text": f"{i} {text}"}) + "\n" for i in range(n)))
    return path


def run_train(args: list[str], out: Path, timeout: float = 3600, allowed: tuple[int, ...] = ()) -> dict:
    """`edgetune train ARGS` in a fresh process: its peak RSS (wait4), wall time, exit code and log.

    An exit code other than 0 raises, unless it is in `allowed` (3: the memory guard stopped it).
    """
    command = [sys.executable, "-m", "edgetune", "train", "--output", str(out), "--force",
               "--no-progress", "--save-every", "0", *args]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()  # read before waiting: a full pipe would block the child
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and code not in allowed:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    log_file = out / "train_log.jsonl"
    log = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.is_file() else []
    return {"peak_rss": usage.ru_maxrss * 1024, "wall_s": time.perf_counter() - started,
            "log": log, "output": output, "exit_code": code}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
