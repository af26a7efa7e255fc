"""Fault injection: kill `edgetune train` at random moments, resume it, and compare with a clean run.

One uninterrupted run gives the reference adapter. Then each trial starts the same run afresh, kills
it with SIGKILL at a random moment, and continues it with `edgetune train --resume` (or, when the
kill came before the run had recorded its settings, with the original command again). A moment is
a random step of the run (0: during start-up) plus a random delay inside that step, so kills land
in start-up, in forward/backward passes, in log writes and inside checkpoint writes (every second
step writes one). A trial passes when:
- the final adapter's sha256 equals the uninterrupted run's;
- no temporary file, leftover folder or lock file remains in the run folder;
- no process printed a traceback;
- train_log.jsonl holds every step exactly once.

    python benchmarks/fault_injection.py --trials 20
"""

import argparse
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEFTOVER = re.compile(r"(\.(tmp|old|del)-\d+$)|(\.edgetune\.lock$)|(\.edgetune-lock$)")


def tiny_model(folder: Path) -> Path:
    """The test suite's tiny random model (2 layers, hidden 64, a 300-token BPE tokenizer)."""
    spec = importlib.util.spec_from_file_location("conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    data = folder / "data.jsonl"
    conftest.write_jsonl(data, [{"instruction": f"Repeat the number {i}.", "output": f"{i} {i}"}
                                for i in range(64)])
    return conftest.build_tiny_model(folder / "model")


def command(model: Path, data: Path, run: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "edgetune", "train", "--model", str(model), "--data", str(data),
            "--output", str(run), "--dtype", "fp32", "--seq-len", "64", "--batch-size", "4",
            "--rank", "4", "--steps", str(steps), "--save-every", "2", "--eval-every", "5",
            "--keep-checkpoints", "2", "--threads", "1", "--no-progress", "--lr", "1e-2"]


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def logged_steps(run_dir: Path) -> int:
    try:
        return len((run_dir / "train_log.jsonl").read_bytes().splitlines())
    except OSError:
        return 0


def kill_at(args: list[str], env: dict, run_dir: Path, step: int, delay: float) -> dict:
    """Start `args`, SIGKILL it `delay` seconds after its log reaches `step` records."""
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd=ROOT)
    started = time.perf_counter()
    while step > 0 and logged_steps(run_dir) < step and child.poll() is None:
        time.sleep(0.0005)
    time.sleep(delay)
    in_write = any(run_dir.glob("checkpoints/.step-*.tmp-*"))
    child.send_signal(signal.SIGKILL)
    _, err = child.communicate()
    return {"at_s": round(time.perf_counter() - started, 3), "returncode": child.returncode,
            "in_checkpoint_write": in_write, "stderr": err}


def leftovers(run_dir: Path) -> list[str]:
    return [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if LEFTOVER.search(p.name)]


def trial(index: int, rng: random.Random, base: list[str], run_dir: Path, env: dict, steps: int,
          startup_s: float, step_s: float, reference: str) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    step = rng.randint(0, steps - 1)
    delay = rng.uniform(0, startup_s) if step == 0 else rng.uniform(0, 1.5 * step_s)
    killed = kill_at(base, env, run_dir, step, delay)
    recorded = (run_dir / "edgetune_run.yaml").is_file()
    recovery = run(base[:base.index("--output") + 2] + ["--resume"] if recorded else base, env)
    log = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()] \
        if (run_dir / "train_log.jsonl").is_file() else []
    adapter = run_dir / "adapter_model.safetensors"
    result = {"trial": index, "kill_step": step, "kill_after_s": killed["at_s"],
              "killed": killed["returncode"] == -signal.SIGKILL,
              "in_checkpoint_write": killed["in_checkpoint_write"],
              "recovered_with": "--resume" if recorded else "the same command",
              "recovery_rc": recovery.returncode,
              "same_adapter": adapter.is_file() and sha256(adapter) == reference,
              "leftovers": leftovers(run_dir), "log_ok": log == list(range(1, steps + 1)),
              "tracebacks": sum("Traceback" in text for text in (killed["stderr"], recovery.stderr,
                                                                  recovery.stdout))}
    if recovery.returncode != 0:
        result["error"] = recovery.stderr.strip().splitlines()[-1:]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgetune-faults-"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONWARNINGS": "ignore"}
    try:
        model = tiny_model(work)
        data, run_dir = work / "data.jsonl", work / "run"
        base = command(model, data, run_dir, args.steps)
        started = time.perf_counter()
        clean = run(base, env)
        wall = time.perf_counter() - started
        if clean.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{clean.stderr[-2000:]}")
        reference = sha256(run_dir / "adapter_model.safetensors")
        speed = json.loads((run_dir / "train_log.jsonl").read_text().splitlines()[-1])
        step_s = max(0.005, 64 * 4 / max(speed["tokens_per_s"], 1.0))  # a step's time, roughly
        startup_s = max(1.0, wall - args.steps * step_s)
        print(f"uninterrupted: {wall:.1f} s, adapter sha256 {reference[:16]}...")
        rng = random.Random(args.seed)
        results = []
        for i in range(1, args.trials + 1):
            result = trial(i, rng, base, run_dir, env, args.steps, startup_s, step_s, reference)
            results.append(result)
            print(json.dumps(result), flush=True)
        report(results)
        ok = all(r["same_adapter"] and not r["leftovers"] and not r["tracebacks"] and r["log_ok"]
                 for r in results)
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results: list[dict]) -> None:
    n = len(results)
    same = sum(r["same_adapter"] for r in results)
    print(f"\nkilled (SIGKILL) and resumed: {n} runs")
    print(f"  same adapter sha256 as the uninterrupted run: {same}/{n}")
    print(f"  kills inside a checkpoint write: {sum(r['in_checkpoint_write'] for r in results)}, "
          f"in start-up (before step 1): {sum(r['kill_step'] == 0 for r in results)}, "
          f"recovered by re-running (killed before the run was recorded): "
          f"{sum(r['recovered_with'] != '--resume' for r in results)}")
    print(f"  temporary files or locks left: {sum(len(r['leftovers']) for r in results)}")
    print(f"  tracebacks: {sum(r['tracebacks'] for r in results)}")
    print(f"  logs with every step exactly once: {sum(r['log_ok'] for r in results)}/{n}")


if __name__ == "__main__":
    sys.exit(main())
