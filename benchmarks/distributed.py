"""Two data-parallel processes x 1 thread against one process x 2 threads, on the real SmolLM2-135M.

    python benchmarks/distributed.py [--steps 6] [--repeats 2] [--seq-len 256]

Both read the same global batch per step (2 x --batch-size examples: one process with --grad-accum 2,
two with --nproc 2), fp32, packed text records that fill --seq-len. Runs alternate, so both sides
see the same load on a shared machine; the figure is the median over steps after the first (which
warms up) of each run's training tokens/s, then the median over repeats, and their ratio. The load
average is printed beside it: on a shared machine it says how much the figures mean.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import full_length_text, median, run_train, smollm2_dir

SIDES = {"1 process x 2 threads": ["--threads", "2", "--grad-accum", "2"],
         "2 processes x 1 thread": ["--threads", "1", "--nproc", "2"]}
# With --one-thread: one process on one thread too, to tell the cost of OpenMP's threads waiting for
# each other on busy cores from the gain of data parallelism.
ONE_THREAD = {"1 process x 1 thread": ["--threads", "1", "--grad-accum", "2"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--one-thread", action="store_true")
    args = parser.parse_args()
    sides = {**SIDES, **(ONE_THREAD if args.one_thread else {})}
    speeds: dict[str, list[float]] = {name: [] for name in sides}
    rss: dict[str, list[int]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        data = full_length_text(Path(tmp) / "data.jsonl", 64, args.seq_len)
        common = ["--model", str(smollm2_dir()), "--data", str(data), "--dtype", "fp32",
                  "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch-size",
                  str(args.batch_size), "--eval-split", "0", "--eval-every", "0", "--rank", "16"]
        loads = [os.getloadavg()[0]]
        for repeat in range(args.repeats):
            for name, flags in sides.items():
                run = run_train(common + flags, Path(tmp) / "run")
                steps = [r["tokens_per_s"] for r in run["log"][1:]]
                speeds[name].append(median(steps))
                rss[name].append(max(r["rss_mb"] for r in run["log"]))
                loads.append(os.getloadavg()[0])
                print(f"repeat {repeat + 1} {name}: {speeds[name][-1]:.0f} tokens/s "
                      f"(steps: {', '.join(f'{s:.0f}' for s in steps)}), rank-0 RSS "
                      f"{rss[name][-1]} MiB, load average {loads[-1]:.1f}", flush=True)
    base, dp = (median(speeds[name]) for name in SIDES)
    print(f"SmolLM2-135M, fp32, LoRA rank 16, global batch {2 * args.batch_size} x {args.seq_len} "
          f"tokens, {args.steps} steps, {args.repeats} repeats; 1-minute load average "
          f"{min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores")
    for name in sides:
        print(f"  {name:<24}{median(speeds[name]):8.0f} tokens/s   rank-0 RSS "
              f"{max(rss[name])} MiB")
    print(f"  ratio (2 processes / 1 process): {dp / base:.2f}")


if __name__ == "__main__":
    main()
