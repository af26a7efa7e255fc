"""QLoRA against LoRA: peak RSS, tokens/s and learning, on SmolLM2-135M and a Llama-3.2-1B shape.

    python benchmarks/qlora.py [--models smollm2-135m,llama-3.2-1b] [--repeats 3] [--only NAME]
                               [--learning] [--learning-seeds 3] [--learning-first-seed 0]

Each configuration trains in a fresh process; peak RSS is that process's maximum resident set (wait4).
Speed runs are interleaved across configurations and repeated, and medians are reported, because the
machine is shared. The LoRA baseline runs in the compute dtype the CPU supports natively (fp32 on a CPU
without AVX512-BF16; bf16 where it has it).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import full_length_text, median, run_train, shaped_model, smollm2_dir  # noqa: E402

CONFIGS = {  # name: extra train flags
    "lora + adamw": ["--quant", "none", "--optim", "adamw"],
    "nf4 + adamw": ["--quant", "nf4", "--optim", "adamw"],
    "nf4 + adamw8bit": ["--quant", "nf4", "--optim", "adamw8bit"],
}


def memory_and_speed(model: Path, data: Path, work: Path, repeats: int, seq_len: int,
                     batch: int, steps: int, only: str = "") -> dict:
    results: dict = {}
    common = ["--model", str(model), "--data", str(data), "--seq-len", str(seq_len),
              "--batch-size", str(batch), "--steps", str(steps), "--eval-split", "0",
              "--eval-every", "0", "--rank", "16"]
    for rep in range(repeats):
        for name, flags in CONFIGS.items():
            for ckpt in (False, True):
                key = f"{name}{' + ckpt' if ckpt else ''}"
                if only not in key:
                    continue
                extra = flags + (["--grad-checkpointing"] if ckpt else [])
                run = run_train(common + extra, work / "run")
                speeds = [r["tokens_per_s"] for r in run["log"][1:]]  # skip warm-up step
                entry = results.setdefault(key, {"peak_rss": [], "tokens_per_s": []})
                entry["peak_rss"].append(run["peak_rss"])
                entry["tokens_per_s"].append(median(speeds))
                print(f"  rep {rep} {key}: {run['peak_rss'] / 2**30:.2f} GiB, "
                      f"{median(speeds):.1f} tok/s", flush=True)
    return results


def print_table(title: str, results: dict, model: Path, batch: int, seq_len: int) -> None:
    base = results.get("lora + adamw")  # absent when --only leaves it out: no ratios then
    base_rss, base_tps = (median(base["peak_rss"]), median(base["tokens_per_s"])) if base else (0, 0)
    print(f"\n{title}")
    print(f"{'configuration':<34}{'peak RSS':>11}{'vs LoRA':>9}{'tok/s (median)':>16}"
          f"{'spread':>16}{'vs LoRA':>9}")
    for key, entry in results.items():
        rss, tps = median(entry["peak_rss"]), median(entry["tokens_per_s"])
        spread = f"{min(entry['tokens_per_s']):.0f}-{max(entry['tokens_per_s']):.0f}"
        rss_ratio, tps_ratio = (f"{rss / base_rss:.2f}", f"{tps / base_tps:.2f}") if base else ("-", "-")
        print(f"{key:<34}{rss / 2**30:>8.2f} GiB{rss_ratio:>9}{tps:>16.1f}{spread:>16}{tps_ratio:>9}")
    from edgetune.hardware import cpu_has_bf16

    if not cpu_has_bf16():
        # bf16 matmuls are emulated here (0.2-6 GFLOP/s a thread): a bf16 LoRA step on a 1B model takes
        # tens of minutes, so the bf16 baseline is the planner's prediction, said as such.
        from edgetune.plan.memory import Setting, breakdown
        from edgetune.shape import shape_from_model_dir

        bf16 = breakdown(shape_from_model_dir(model), Setting(
            quant="none", optim="adamw", rank=16, batch_size=batch, seq_len=seq_len, dtype="bf16")).peak
        if "nf4 + adamw8bit + ckpt" not in results:
            return
        smallest = median(results["nf4 + adamw8bit + ckpt"]["peak_rss"])
        print(f"{'bf16 LoRA + adamw (predicted)':<34}{bf16 / 2**30:>8.2f} GiB; "
              f"nf4 + adamw8bit + ckpt measured / bf16 LoRA predicted = {smallest / bf16:.2f}")


def shipped_eval_loss(run_dir: Path, eval_file: Path) -> float:
    """Mean token loss on `eval_file` of the model export writes: the full-precision base + adapter.

    For LoRA this is the model as trained. For QLoRA the adapter trained beside the 4-bit base is
    applied to the original weights, as `edgetune export` merges it.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from edgetune.records import read_jsonl
    from edgetune.train.data import encode
    from edgetune.train.loop import mean_token_loss
    from edgetune.train.model import load_base

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    model = PeftModel.from_pretrained(load_base(smollm2_dir(), torch.float32, "cpu"), run_dir).eval()
    fmt, records = read_jsonl(eval_file)
    return mean_token_loss(model, encode(tokenizer, fmt, records), 8, tokenizer.pad_token_id,
                           packed=False, device="cpu")


def learning(work: Path, steps: int, seeds: range) -> None:
    """Quick-start task: held-out exact match and eval loss, LoRA vs QLoRA after the same steps.

    QLoRA runs twice, with fp32 and with 8-bit optimizer states, to tell the 4-bit base's share of
    a difference from the optimizer's.

    Each side trains once per seed (the seed sets the adapter's initialisation and the data order);
    medians are compared, because at this loss (~0.01) one run's eval loss moves by tens of percent
    with the seed alone. Two eval losses: the trainer's (for QLoRA, the 4-bit base + adapter it
    trained) and the shipped model's (full-precision base + adapter, what export merges); exact
    match is the shipped model's.
    """
    from edgetune.examples import dates
    from edgetune.quickstart import held_out_accuracy

    train_file, eval_file = dates.write(work / "dates")
    held_out = [json.loads(line) for line in eval_file.read_text().splitlines()]
    sides = {name: CONFIGS[name] for name in ("lora + adamw", "nf4 + adamw", "nf4 + adamw8bit")}
    rows: dict = {name: [] for name in sides}
    for seed in seeds:
        for name, flags in sides.items():  # interleaved, so both sides see the same machine
            run_dir = work / f"{name.replace(' ', '').replace('+', '-')}-seed{seed}"
            run = run_train(["--model", "smollm2-135m", "--data", str(train_file), "--eval-data",
                             str(eval_file), "--steps", str(steps), "--batch-size", "8", "--lr", "1e-3",
                             "--seed", str(seed), "--eval-every", str(steps), *flags], run_dir)
            accuracy, _ = held_out_accuracy(smollm2_dir(), run_dir, held_out)
            trained, shipped = run["log"][-1]["eval_loss"], shipped_eval_loss(run_dir, eval_file)
            rows[name].append((accuracy, trained, shipped))
            print(f"  seed {seed} {name}: exact match {accuracy:.1%}, eval loss {trained:.4f} "
                  f"as trained, {shipped:.4f} shipped", flush=True)
    print(f"\nlearning on the quick-start task ({steps} steps, {len(held_out)} held-out dates, "
          f"seeds {seeds.start}-{seeds.stop - 1}; median, then min-max)")
    medians = {}
    for name, runs in rows.items():
        columns = list(zip(*runs))
        medians[name] = [median(c) for c in columns]
        spreads = [f"{min(c):.4f}-{max(c):.4f}" for c in columns[1:]]
        print(f"{name:<20} exact match {medians[name][0]:.1%} "
              f"({min(columns[0]):.0%}-{max(columns[0]):.0%})  eval loss as trained "
              f"{medians[name][1]:.4f} ({spreads[0]}), shipped {medians[name][2]:.4f} ({spreads[1]})")
    lora = medians["lora + adamw"]
    for name in list(sides)[1:]:
        other = medians[name]
        print(f"{name} / LoRA (medians): accuracy {other[0] / lora[0]:.3f}, eval loss as trained "
              f"{other[1] / lora[1]:.3f}, shipped {other[2] / lora[2]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="run only configurations whose name contains this")
    parser.add_argument("--learning", action="store_true", help="also compare learning")
    parser.add_argument("--learning-steps", type=int, default=40)
    parser.add_argument("--learning-seeds", type=int, default=3, help="how many seeds")
    parser.add_argument("--learning-first-seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for models and runs (default: temp)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="edgetune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = full_length_text(work / "text.jsonl", 64, 600)
    for name in filter(None, args.models.split(",")):
        if name == "smollm2-135m":
            model, seq_len, batch, steps = smollm2_dir(), 256, 4, 3
        else:
            model, seq_len, batch, steps = shaped_model(name, work), 256, 1, 2
        print(f"{name}: batch {batch} x {seq_len} tokens, {steps} steps, {args.repeats} repeats",
              flush=True)
        results = memory_and_speed(model, data, work, args.repeats, seq_len, batch, steps, args.only)
        print_table(f"{name} (batch {batch} x {seq_len})", results, model, batch, seq_len)
    if args.learning:
        first = args.learning_first_seed
        learning(work, args.learning_steps, range(first, first + args.learning_seeds))


if __name__ == "__main__":
    main()
