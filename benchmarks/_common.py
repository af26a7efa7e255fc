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
    given) and SmolLM2's tokenizer (ids fit), stored in bf16 safetensors.

    Built in a child process: a child's maximum resident set (wait4's ru_maxrss) starts at its
    parent's high-water mark, so a model built here would inflate every later measurement.
    """
    folder = root / (name if layers is None else f"{name}-{layers}l")
    if not (folder / "config.json").is_file():
        code = f"from _common import _build; _build({name!r}, {str(folder)!r}, {layers!r})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return folder


def _build(name: str, folder: str, layers: int | None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgetune.plan.catalogue import CATALOGUE

    shape = dict(CATALOGUE[name][1])  # the exact config.json numbers the planner uses
    if layers is not None:
        shape["num_hidden_layers"] = layers
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    final = Path(folder)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    source = smollm2_dir()
    for file in source.iterdir():
        if file.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(file, tmp / file.name)
    tmp.rename(final)


def full_length_text(path: Path, n: int, words: int) -> Path:
    """Plain-text records long enough to fill any --seq-len up to about `words` tokens."""
    sentence = "The quick brown fox jumps over the lazy dog while the small model learns. "
    text = (sentence * (words // 12 + 1)).strip()
    path.write_text("".join(json.dumps({"text": f"{i} {text}"}) + "\n" for i in range(n)))
    return path


# The trainer's CLI with its own peak resident set (VmHWM) written to argv[1] at exit: wait4's
# ru_maxrss would also count the parent's high-water mark, which the child starts from.
_TRAIN = ("import atexit, sys; from pathlib import Path; "
          "atexit.register(lambda: Path(sys.argv[1]).write_text(next(line for line in "
          "open('/proc/self/status') if line.startswith('VmHWM')).split()[1])); "
          "from edgetune.cli import main; sys.exit(main(sys.argv[2:]))")


def run_train(args: list[str], out: Path, timeout: float = 3600, allowed: tuple[int, ...] = ()) -> dict:
    """`edgetune train ARGS` in a fresh process: its peak RSS (VmHWM), wall time, exit code and log.

    An exit code other than 0 raises, unless it is in `allowed` (3: the memory guard stopped it).
    """
    peak_file = out.with_name(out.name + ".vmhwm")
    out.parent.mkdir(parents=True, exist_ok=True)
    peak_file.unlink(missing_ok=True)
    command = [sys.executable, "-c", _TRAIN, str(peak_file), "train", "--output", str(out), "--force",
               "--no-progress", "--save-every", "0", *args]
    started = time.perf_counter()
    child = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout)
    if child.returncode != 0 and child.returncode not in allowed:
        raise RuntimeError(f"{' '.join(command)} failed:\n{child.stdout[-3000:]}")
    log_file = out / "train_log.jsonl"
    log = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.is_file() else []
    return {"peak_rss": int(peak_file.read_text()) * 1024, "wall_s": time.perf_counter() - started,
            "log": log, "output": child.stdout, "exit_code": child.returncode}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
