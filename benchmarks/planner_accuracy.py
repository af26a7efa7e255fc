"""The planner against measured peak RSS: real `edgetune train` runs, each in a fresh process.

    python benchmarks/planner_accuracy.py [--only SUBSTRING] [--repeats N] [--results FILE] [--report]
                                          [--methods]
    python benchmarks/planner_accuracy.py --random N --seed S [--results FILE] [--report]

Each configuration trains 3 steps on data whose every example fills --seq-len (so activations are at
their maximum); the peak is the child's maximum resident set (wait4 ru_maxrss), which counts the
memory-mapped checkpoint file as the planner does. With --repeats N each configuration runs N
times in fresh processes and the median peak is compared; the spread is printed, because glibc's
heap makes the same run's peak vary by a few percent between processes.

Without --random: a fixed table on the real SmolLM2-135M and Gemma 3 270M (262,144-token
vocabulary, sliding-window layers), and random models with the exact shapes of Qwen2.5-0.5B and
Llama-3.2-1B. With --random N --seed S: N configurations drawn by benchmarks/_random_configs.py
(shapes, base format, optimizer, rank, micro-batch, sequence length, checkpointing; one in three a
`--plan auto --ram B` question). Every random run trains under `--ram`: the least budget the
planner accepts its settings for, or B for `--plan auto`, so the memory guard is checked with the
planner: a run the planner accepted for its budget must not stop. Measurements are saved to
--results, and --report re-prints the table with the planner's current numbers.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import full_length_text, median, run_train, shaped_model  # noqa: E402
from _common import model_dir as shared_model_dir  # noqa: E402
from _random_configs import STEPS, Draw, draw, predicted_peak, seconds, shape_of  # noqa: E402

from edgetune.models import BUILTIN  # noqa: E402
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


def common_args(model: Path, work: Path, seq: int, dtype: str) -> list[str]:
    data = full_length_text(work / f"data-{seq}.jsonl", 64, seq * 2)
    return ["--model", str(model), "--data", str(data), "--steps", str(STEPS), "--seq-len", str(seq),
            "--dtype", dtype, "--eval-split", "0", "--eval-every", "0"]


def setting_args(quant: str, optim: str, rank: int, batch: int, ckpt: bool) -> list[str]:
    return ["--batch-size", str(batch), "--rank", str(rank), "--quant", quant, "--optim", optim,
            "--grad-checkpointing" if ckpt else "--no-grad-checkpointing"]


def runs(args: list[str], work: Path, repeats: int) -> dict:
    """`repeats` fresh runs: median peak, each peak, median tokens/s, and how the runs ended."""
    peaks, speeds, ends, wall = [], [], [], 0.0
    for _ in range(repeats):
        run = run_train(args, work / "run", allowed=(3,))
        wall += run["wall_s"]
        peaks.append(run["peak_rss"])
        speeds += [r["tokens_per_s"] for r in run["log"][1:]]
        ends.append(_guard_outcome(run))
    return {"peak_rss": median(peaks), "peaks": peaks, "guard": ends,
            "tokens_per_s": median(speeds) if speeds else None, "wall_s": round(wall)}


def _guard_outcome(run: dict) -> str:
    """'ok', or the trainer's line when its memory guard stopped the run or warned on the last step."""
    lines = [line for line in run["output"].splitlines()
             if "stopped at step" in line or "warning: on the last step" in line]
    return "ok" if run["exit_code"] == 0 and not lines else (lines[-1] if lines else f"exit {run['exit_code']}")


def measure(config: tuple, work: Path, dtype: str, repeats: int) -> dict:
    model, quant, optim, rank, batch, seq, ckpt = config
    args = common_args(model_dir(model, work), work, seq, dtype) + setting_args(quant, optim, rank,
                                                                                batch, ckpt)
    return runs(args, work, repeats)


def measure_draw(d: Draw, work: Path, repeats: int) -> dict:
    """One drawn configuration under its --ram; for --plan auto, what the trainer chose too."""
    args = common_args(shaped_model(d.model, work, d.layers), work, d.seq_len, "fp32")
    args += ["--ram", f"{d.budget // 2**20}mb"]
    args += (["--plan", "auto", "--batch-size", str(d.target_batch)] if d.auto
             else setting_args(d.quant, d.optim, d.rank, d.batch, d.ckpt))
    result = {**runs(args, work, repeats), "draw": d.as_dict()}
    if d.auto:
        import yaml

        saved = yaml.safe_load((work / "run" / "edgetune_run.yaml").read_text())
        result["chosen"] = {k: saved[k] for k in ("quant", "optim", "rank", "batch_size", "grad_accum",
                                                 "grad_checkpointing")}
    return result


def predict(config: tuple, work: Path, dtype: str) -> tuple[int, float]:
    model, quant, optim, rank, batch, seq, ckpt = config[:7]
    shape = shape_from_model_dir(model_dir(model, work))
    setting = Setting(quant=quant, rank=rank, batch_size=batch, seq_len=seq,
                      grad_checkpointing=ckpt, optim=optim, dtype=dtype, method=method_of(config))
    peak = breakdown(shape, setting).peak if model in BUILTIN else predicted_peak(shape, setting)
    return peak, tokens_per_second(shape, setting, cached_gflops())


def ran_setting(d: Draw, entry: dict) -> Setting:
    """The settings the run trained with: the draw's, or what `--plan auto` chose."""
    chosen = entry.get("chosen")
    if not chosen:
        return d.setting()
    return Setting(quant=chosen["quant"], rank=chosen["rank"], batch_size=chosen["batch_size"],
                   seq_len=d.seq_len, grad_checkpointing=chosen["grad_checkpointing"],
                   optim=chosen["optim"], dtype="fp32", grad_accum=chosen["grad_accum"])


def _same_plan(d: Draw, entry: dict) -> str:
    chosen = entry.get("chosen")
    if not chosen:
        return ""
    drawn = {"quant": d.quant, "optim": d.optim, "rank": d.rank, "batch_size": d.batch,
             "grad_accum": d.grad_accum, "grad_checkpointing": d.ckpt}
    return "same" if chosen == drawn else "DIFFERS"


def summary(errors: list[float], label: str = "") -> str:
    if not errors:
        return f"{label}none"
    worst = max(errors, key=abs)
    return (f"{label}{len(errors)} configurations: median error {median(errors):+.1%}, worst "
            f"{worst:+.1%}, within +-10%: {sum(abs(e) <= 0.10 for e in errors)}")


def report_random(results: dict, fitted: tuple[str, ...] = ()) -> None:
    """Every saved random row, predicted by the planner as it is now; rows named in `fitted` were
    used to change the planner and are left out of the check's figures."""
    print(f"\n{'configuration':<56}{'--ram':>9}{'predicted':>11}{'measured':>11}{'error':>8}"
          f"{'guard':>7}{'plan':>7}")
    errors, int8_errors, stops, differs = [], [], [], 0
    draws = [Draw(**entry["draw"]) for entry in results.values()]
    for d, entry in zip(draws, results.values()):
        predicted = predicted_peak(shape_of(d.model, d.layers), ran_setting(d, entry))
        error = predicted / entry["peak_rss"] - 1
        fit = d.key in fitted
        if not fit:
            errors.append(error)
        if ran_setting(d, entry).quant == "int8" and not fit:
            int8_errors.append(error)
        guard = "ok" if all(g == "ok" for g in entry["guard"]) else "STOP"
        if guard != "ok":
            stops.append(f"{d.key}: {[g for g in entry['guard'] if g != 'ok'][0]}")
        same = _same_plan(d, entry)
        differs += same == "DIFFERS"
        print(f"{d.key:<56}{d.budget / 2**30:>6.2f} GiB{predicted / 2**30:>8.2f} GiB"
              f"{entry['peak_rss'] / 2**30:>8.2f} GiB{error:>+8.1%}{guard:>7}{same:>7}"
              f"{' (fit)' if fit else ''}")
    print(f"\ncheck, {len(fitted)} fitted rows left out: " + summary(errors))
    print(summary(int8_errors, "int8 rows: "))
    print(f"memory guard: {len(stops)} of {len(draws)} runs stopped or warned under the budget the "
          f"planner gave them" + "".join(f"\n  {s}" for s in stops))
    autos = sum(d.auto for d in draws)
    print(f"--plan auto: {autos - differs} of {autos} runs chose the settings `edgetune plan` chose")


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
    print("\n" + summary(errors))
    if speed_errors:
        print(f"tokens/s estimate: median error {median(speed_errors):+.0%}, within +-30%: "
              f"{sum(abs(e) <= 0.30 for e in speed_errors)} of {len(speed_errors)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only configurations whose name contains this")
    parser.add_argument("--methods", action="store_true",
                        help="the adapter-method rows (METHOD_CONFIGS) instead of the LoRA ones")
    parser.add_argument("--repeats", type=int, default=1, help="fresh-process runs per configuration")
    parser.add_argument("--random", type=int, default=0, metavar="N",
                        help="N configurations drawn at random instead of the fixed table")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random draw")
    parser.add_argument("--results", default=None, help="JSON file of measurements (default: in "
                        "the temporary folder, one per table and seed)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "planner_accuracy"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                        help="compute dtype of the fixed table (fp32 on CPUs without native bf16)")
    parser.add_argument("--report", action="store_true", help="only re-print the saved results")
    parser.add_argument("--cheapest-first", action="store_true",
                        help="run the --random draw in order of estimated run time (rows already in "
                             "--results are never run again)")
    parser.add_argument("--fitted", action="append", default=[], metavar="CONFIGURATION",
                        help="a --random row that the planner was fitted on: marked, and left out "
                             "of the check's figures (repeatable)")
    args = parser.parse_args()
    configs = METHOD_CONFIGS if args.methods else CONFIGS
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    name = f"planner_accuracy-random-{args.seed}.json" if args.random else "planner_accuracy.json"
    results_file = Path(args.results or Path(tempfile.gettempdir()) / name)
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    todo = draw(args.random, args.seed) if args.random else configs
    if args.random and args.cheapest_first:
        todo = sorted(todo, key=lambda d: seconds(shape_of(d.model, d.layers), d.setting(),
                                                  d.grad_accum))
    for item in [] if args.report else todo:
        label = item.key if args.random else key(item)
        if args.only not in label or (args.random and label in results):
            continue
        results[label] = (measure_draw(item, work, args.repeats) if args.random
                          else measure(item, work, args.dtype, args.repeats))
        results_file.write_text(json.dumps(results, indent=2))
        print(f"{label}: peak {results[label]['peak_rss'] / 2**30:.2f} GiB, "
              f"guard {results[label]['guard']}", flush=True)
    if args.random:
        report_random(results, tuple(args.fitted))
    else:
        report(results, work, args.dtype, configs)


if __name__ == "__main__":
    main()
