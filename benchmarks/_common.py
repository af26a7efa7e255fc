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


def shaped_model(name: str, root: Path) -> Path:
    """A random-initialised model with `name`'s exact shape and SmolLM2's tokenizer (ids fit)."""
    folder = root / name
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgetune.plan.catalogue import CATALOGUE

    shape = dict(CATALOGUE[name][1])  # the exact config.json numbers the planner uses
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


def run_train(args: list[str], out: Path, timeout: float = 3600) -> dict:
    """`edgetune train ARGS` in a fresh process: its peak RSS (wait4), wall time and log."""
    command = [sys.executable, "-m", "edgetune", "train", "--output", str(out), "--force",
               "--no-progress", "--save-every", "0", *args]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    output = child.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {"peak_rss": usage.ru_maxrss * 1024, "wall_s": time.perf_counter() - started,
            "log": log, "output": output}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
