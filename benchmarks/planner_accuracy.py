"""The planner against measured peak RSS: real `edgetune train` runs, each in a fresh process.

    python benchmarks/planner_accuracy.py [--only SUBSTRING] [--repeats N] [--results FILE] [--report]
                                          [--methods]

Each configuration trains 3 steps on data whose every example fills --seq-len (so activations are at
their maximum); the peak is the child's maximum resident set (wait4 ru_maxrss), which counts the
memory-mapped checkpoint file as the planner does. With --repeats N each configuration runs N
times in fresh processes and the median peak is compared; the spread is printed, because glibc's
heap makes the same run's peak vary by a few percent between processes. Models: the real
SmolLM2-135M and Gemma 3 270M (262,144-token vocabulary, sliding-window layers), and random models
with the exact shapes of Qwen2.5-0.5B (151,936-token vocabulary) and Llama-3.2-1B. Measurements are saved to --results, and --report re-prints the table from them
with the planner's current numbers.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import full_length_text, median, run_train  # noqa: E402
from _common import model_dir as shared_model_dir  # noqa: E402

from edgetune.plan.memory import Setting, breakdown  # noqa: E402
from edgetune.plan.timing import cached_gflops, tokens_per_second  # noqa: E402
from edgetune.shape import shape_from_model_dir  # noqa: E402

# (model, quant, optim, rank, batch, seq_len, checkpointing)
CONFIGS = [
    ("smollm2-135m", "none", "adamw", 16, 4, 256, False),
    ("smollm2-135m", "none", "adamw", 16, 4, 256, True),
    ("smollm2-135m", "none", "adamw", 8, 1, 64, False),
    ("smollm2-135m", "none", "adamw", 64, 2, 128, True),
    ("smollm2-135m", "nf4", "adamw8bit", 16, 2, 128, True),
    ("smollm2-135m", "nf4", "adamw", 16, 2, 128, False),
    ("smollm2-135m", "int8", "adamw", 16, 1, 128, False),
    ("smollm2-135m", "none", "adamw8bit", 32, 2, 256, True),
    ("qwen2.5-0.5b", "none", "adamw", 16, 1, 128, False),
    ("qwen2.5-0.5b", "nf4", "adamw8bit", 16, 2, 128, True),
    ("llama-3.2-1b", "nf4", "adamw8bit", 16, 1, 128, True),
    ("llama-3.2-1b", "none", "adamw", 8, 1, 64, True),
    ("gemma3-270m", "none", "adamw", 16, 4, 256, False),
    ("gemma3-270m", "nf4", "adamw8bit", 16, 2, 256, True),
]

# ---- Adapter methods other than LoRA (edgetune train --method): measured with --methods. --------
# (model, quant, optim, rank, batch, seq_len, checkpointing, method)
METHOD_CONFIGS = [
    ("smollm2-135m", "none", "adamw", 16, 4, 256, False, "lora"),  # the same run with LoRA
    ("smollm2-135m", "none", "adamw", 16, 4, 256, False, "dora"),
    ("smollm2-135m", "none", "adamw", 16, 4, 256, False, "ia3"),
    ("smollm2-135m", "none", "adamw", 16, 4, 256, False, "prompt"),
    ("smollm2-135m", "none", "adamw", 16, 4, 256, False, "adalora"),
    ("smollm2-135m", "none", "adamw", 16, 4, 256, False, "prefix"),
]
# ---- end of the method rows ------------------------------------------------------------------


def method_of(config: tuple) -> str:
    return config[7] if len(config) > 7 else "lora"


def key(config: tuple) -> str:
    model, quant, optim, rank, batch, seq, ckpt = config[:7]
    method = f" {method_of(config)}" if len(config) > 7 else ""
    return f"{model} {quant} {optim} r{rank} {batch}x{seq}{' ckpt' if ckpt else ''}{method}"


def model_dir(name: str, work: Path) -> Path:
    return shared_model_dir(name, work)


def measure(config: tuple, work: Path, dtype: str, repeats: int) -> dict:
    model, quant, optim, rank, batch, seq, ckpt = config[:7]
    data = full_length_text(work / f"data-{seq}.jsonl", 64, seq * 2)
    args = ["--model", str(model_dir(model, work)), "--data", str(data), "--steps", "3",
            "--method", method_of(config),
            "--batch-size", str(batch), "--seq-len", str(seq), "--rank", str(rank), "--quant", quant,
            "--optim", optim, "--dtype", dtype, "--eval-split", "0", "--eval-every", "0",
            "--grad-checkpointing" if ckpt else "--no-grad-checkpointing"]
    peaks, speeds = [], []
    for _ in range(repeats):
        run = run_train(args, work / "run")
        peaks.append(run["peak_rss"])
        speeds += [r["tokens_per_s"] for r in run["log"][1:]]
    return {"peak_rss": median(peaks), "peaks": peaks,
            "tokens_per_s": median(speeds) if speeds else None}


def predict(config: tuple, work: Path, dtype: str) -> tuple[int, float]:
    model, quant, optim, rank, batch, seq, ckpt = config[:7]
    shape = shape_from_model_dir(model_dir(model, work))
    setting = Setting(quant=quant, rank=rank, batch_size=batch, seq_len=seq,
                      grad_checkpointing=ckpt, optim=optim, dtype=dtype, method=method_of(config))
    return breakdown(shape, setting).peak, tokens_per_second(shape, setting, cached_gflops())


def report(results: dict, work: Path, dtype: str, configs: list) -> None:
    print(f"\n{'configuration':<52}{'predicted':>11}{'measured':>11}{'error':>8}"
          f"{'spread':>11}{'tok/s pred':>12}{'tok/s meas':>12}{'error':>8}")
    errors, speed_errors = [], []
    for config in configs:
        entry = results.get(key(config))
        if entry is None:
            continue
        predicted, speed = predict(config, work, dtype)
        error = predicted / entry["peak_rss"] - 1
        errors.append(error)
        measured_speed = entry.get("tokens_per_s")
        speed_error = speed / measured_speed - 1 if measured_speed else float("nan")
        if measured_speed:
            speed_errors.append(speed_error)
        peaks = entry.get("peaks", [entry["peak_rss"]])
        spread = f"{min(peaks) / 2**30:.2f}-{max(peaks) / 2**30:.2f}" if len(peaks) > 1 else ""
        print(f"{key(config):<52}{predicted / 2**30:>8.2f} GiB{entry['peak_rss'] / 2**30:>8.2f} GiB"
              f"{error:>+8.1%}{spread:>11}{speed:>12.0f}{measured_speed or 0:>12.0f}"
              f"{speed_error:>+8.0%}")
    if errors:
        worst = max(errors, key=abs)
        print(f"\n{len(errors)} configurations: median error {median(errors):+.1%}, "
              f"worst {worst:+.1%}, within +-10%: {sum(abs(e) <= 0.10 for e in errors)}")
    if speed_errors:
        print(f"tokens/s estimate: median error {median(speed_errors):+.0%}, within +-30%: "
              f"{sum(abs(e) <= 0.30 for e in speed_errors)} of {len(speed_errors)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only configurations whose name contains this")
    parser.add_argument("--methods", action="store_true",
                        help="the adapter-method rows (METHOD_CONFIGS) instead of the LoRA ones")
    parser.add_argument("--repeats", type=int, default=1, help="fresh-process runs per configuration")
    parser.add_argument("--results", default=str(Path(tempfile.gettempdir()) / "planner_accuracy.json"))
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "planner_accuracy"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                        help="compute dtype of the runs (fp32 on CPUs without native bf16)")
    parser.add_argument("--report", action="store_true", help="only re-print the saved results")
    args = parser.parse_args()
    configs = METHOD_CONFIGS if args.methods else CONFIGS
    work, results_file = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if not args.report:
        for config in configs:
            if args.only not in key(config):
                continue
            results[key(config)] = measure(config, work, args.dtype, args.repeats)
            results_file.write_text(json.dumps(results, indent=2))
            print(f"{key(config)}: peak {results[key(config)]['peak_rss'] / 2**30:.2f} GiB", flush=True)
    report(results, work, args.dtype, configs)


if __name__ == "__main__":
    main()
