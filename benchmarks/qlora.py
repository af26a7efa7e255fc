"""QLoRA against LoRA: peak RSS, tokens/s and learning, on SmolLM2-135M and a Llama-3.2-1B shape.

    python benchmarks/qlora.py [--models smollm2-135m,llama-3.2-1b] [--repeats 3] [--learning]

Each configuration trains in a fresh process; peak RSS is that process's maximum resident set (wait4).
Speed runs are interleaved across configurations and repeated, and medians are reported, because the
machine is shared. The LoRA baseline runs in the compute dtype the CPU supports natively (fp32 on a CPU
without AVX512-BF16; bf16 where it has it).
"""

import argparse
import json
import tempfile
from pathlib import Path

from _common import full_length_text, median, run_train, shaped_model, smollm2_dir

CONFIGS = {  # name: extra train flags
    "lora + adamw": ["--quant", "none", "--optim", "adamw"],
    "nf4 + adamw": ["--quant", "nf4", "--optim", "adamw"],
    "nf4 + adamw8bit": ["--quant", "nf4", "--optim", "adamw8bit"],
}


def memory_and_speed(model: Path, data: Path, work: Path, repeats: int, seq_len: int,
                     batch: int, steps: int) -> dict:
    results: dict = {}
    common = ["--model", str(model), "--data", str(data), "--seq-len", str(seq_len),
              "--batch-size", str(batch), "--steps", str(steps), "--eval-split", "0",
              "--eval-every", "0", "--rank", "16"]
    for rep in range(repeats):
        for name, flags in CONFIGS.items():
            for ckpt in (False, True):
                key = f"{name}{' + ckpt' if ckpt else ''}"
                extra = flags + (["--grad-checkpointing"] if ckpt else [])
                run = run_train(common + extra, work / "run")
                speeds = [r["tokens_per_s"] for r in run["log"][1:]]  # skip warm-up step
                entry = results.setdefault(key, {"peak_rss": [], "tokens_per_s": []})
                entry["peak_rss"].append(run["peak_rss"])
                entry["tokens_per_s"].append(median(speeds))
                print(f"  rep {rep} {key}: {run['peak_rss'] / 2**30:.2f} GiB, "
                      f"{median(speeds):.1f} tok/s", flush=True)
    return results


def print_table(title: str, results: dict) -> None:
    base = results["lora + adamw"]
    base_rss, base_tps = median(base["peak_rss"]), median(base["tokens_per_s"])
    print(f"\n{title}")
    print(f"{'configuration':<26}{'peak RSS':>11}{'vs LoRA':>9}{'tok/s (median)':>16}"
          f"{'spread':>16}{'vs LoRA':>9}")
    for key, entry in results.items():
        rss, tps = median(entry["peak_rss"]), median(entry["tokens_per_s"])
        spread = f"{min(entry['tokens_per_s']):.0f}-{max(entry['tokens_per_s']):.0f}"
        print(f"{key:<26}{rss / 2**30:>8.2f} GiB{rss / base_rss:>9.2f}{tps:>16.1f}{spread:>16}"
              f"{tps / base_tps:>9.2f}")


def learning(work: Path, steps: int) -> None:
    """Quick-start task: held-out exact match and eval loss, LoRA vs QLoRA after the same steps."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from edgetune.examples import dates
    from edgetune.quickstart import held_out_accuracy

    train_file, eval_file = dates.write(work / "dates")
    held_out = [json.loads(line) for line in eval_file.read_text().splitlines()]
    rows = []
    for name, flags in (("lora + adamw", CONFIGS["lora + adamw"]),
                        ("nf4 + adamw8bit", CONFIGS["nf4 + adamw8bit"])):
        run_dir = work / name.replace(" ", "").replace("+", "-")
        run = run_train(["--model", "smollm2-135m", "--data", str(train_file), "--eval-data",
                         str(eval_file), "--steps", str(steps), "--batch-size", "8", "--lr", "1e-3",
                         "--eval-every", str(steps), *flags], run_dir)
        accuracy, _ = held_out_accuracy(smollm2_dir(), run_dir, held_out)
        rows.append((name, accuracy, run["log"][-1]["eval_loss"]))
    print(f"\nlearning on the quick-start task ({steps} steps, {len(held_out)} held-out dates)")
    for name, accuracy, eval_loss in rows:
        print(f"{name:<20} exact match {accuracy:.1%}  eval loss {eval_loss:.4f}")
    (_, acc_a, loss_a), (_, acc_b, loss_b) = rows
    print(f"QLoRA / LoRA: accuracy {acc_b / acc_a:.3f}, eval loss {loss_b / loss_a:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--learning", action="store_true", help="also compare learning")
    parser.add_argument("--learning-steps", type=int, default=40)
    parser.add_argument("--work", default=None, help="folder for models and runs (default: temp)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="edgetune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = full_length_text(work / "text.jsonl", 64, 600)
    for name in args.models.split(","):
        if name == "smollm2-135m":
            model, seq_len, batch, steps = smollm2_dir(), 256, 4, 3
        else:
            model, seq_len, batch, steps = shaped_model(name, work), 256, 1, 2
        print(f"{name}: batch {batch} x {seq_len} tokens, {steps} steps, {args.repeats} repeats",
              flush=True)
        results = memory_and_speed(model, data, work, args.repeats, seq_len, batch, steps)
        print_table(f"{name} (batch {batch} x {seq_len})", results)
    if args.learning:
        learning(work, args.learning_steps)


if __name__ == "__main__":
    main()
