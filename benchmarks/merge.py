"""Adapter algebra on SmolLM2-135M: which merge keeps both skills, and what merging costs.

    python benchmarks/merge.py [--work DIR] [--eval-size 100] [--threads 1] [--fresh] [--table]

Two adapters are trained as `edgetune quickstart` trains (40 steps of 8 at lr 1e-3, rank 16, alpha 32):
one on the dates task (edgetune.examples.dates), one on the field-extraction task
(edgetune.examples.fields). Each merge method then combines them with `edgetune merge` in a fresh
process (wall time, CPU time and peak RSS from wait4, and the peak the planner predicted), and the merged
adapter is scored by held-out exact match on both tasks (edgetune.quickstart.held_out_accuracy: greedy
answers of base + adapter in torch). Device-side stacking is scored in llama.cpp: the f16 base GGUF
with both adapter GGUFs applied at once. Each row is compared with each single adapter on its own task.

Results are kept in DIR/results.json as they are measured, so an interrupted run continues where it
stopped (--fresh starts over; trained adapters are always reused).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import run_train, smollm2_dir  # noqa: E402

TASKS = ("dates", "fields")
TRAIN = ["--model", "smollm2-135m", "--steps", "40", "--batch-size", "8", "--lr", "1e-3",
         "--seq-len", "256", "--eval-every", "0"]  # the quick start's settings
MERGES = {  # row name: edgetune merge flags, in the order they are measured
    "linear (1, 1)": ["--method", "linear"],
    "ties d=0.5": ["--method", "ties", "--density", "0.5"],
    "dare_ties d=0.5": ["--method", "dare_ties", "--density", "0.5"],
    "dare_linear d=0.5": ["--method", "dare_linear", "--density", "0.5"],
    "svd rank 16": ["--method", "svd", "--rank", "16"],
}
LATER = {  # measured after stacking: cat is linear's update exactly (tested); the halved sum
    "cat (1, 1)": ["--method", "cat"],
    "linear (0.5, 0.5)": ["--method", "linear", "--weights", "0.5,0.5"],
}
STACK = "stacked in llama.cpp (1, 1)"


def train_adapters(work: Path) -> dict[str, Path]:
    """The two task adapters, trained once (reused when DIR/runs/<task> holds a finished run)."""
    from edgetune.examples import dates, fields

    runs = {}
    for task, module in zip(TASKS, (dates, fields)):
        train_file, eval_file = module.write(work / "data" / task)
        run = work / "runs" / task
        if not (run / "adapter_model.safetensors").is_file():
            print(f"training the {task} adapter (minutes to hours on a busy machine)", flush=True)
            result = run_train([*TRAIN, "--data", str(train_file), "--eval-data", str(eval_file)], run)
            print(f"  {task}: peak RSS {result['peak_rss'] / 2**20:.0f} MiB, "
                  f"{result['wall_s']:.0f} s", flush=True)
        runs[task] = run
    return runs


def held_out(work: Path, size: int) -> dict[str, list[dict]]:
    return {task: [json.loads(line) for line in
                   (work / "data" / task / "eval.jsonl").read_text(encoding="utf-8").splitlines()][:size]
            for task in TASKS}


def run_merge(runs: dict[str, Path], flags: list[str], out: Path, threads: int) -> dict:
    """`edgetune merge` in a fresh process: wall and CPU seconds, peak RSS, predicted peak, energy.

    The peak comes from /usr/bin/time: wait4's ru_maxrss of a child started from this process would
    be this process's own peak (Linux keeps the high-water mark of the memory the child replaced at
    exec, and Python starts children with vfork), and this process holds the model being scored.
    """
    command = ["/usr/bin/time", "-f", "edgetune-bench %M %U %S", sys.executable, "-m", "edgetune",
               "merge", *map(str, runs.values()), *flags, "--output", str(out), "--force",
               "--threads", str(threads)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    import yaml

    merge = yaml.safe_load((out / "edgetune_run.yaml").read_text())["merge"]
    predicted = re.search(r"predicted peak memory ([\d.]+) MiB", output)
    rss_kb, user, system = re.search(r"edgetune-bench (\d+) ([\d.]+) ([\d.]+)", result.stderr).groups()
    return {"wall_s": wall, "cpu_s": float(user) + float(system), "peak_rss": int(rss_kb) * 1024,
            "rss_by": "/usr/bin/time", "rank": merge["rank"],
            "predicted_peak": float(predicted.group(1)) * 2**20 if predicted else None,
            "energy_min": merge["energy_kept"]["min"], "energy_median": merge["energy_kept"]["median"]}


def torch_scores(model_dir: Path, adapter: Path | None, records: dict) -> dict[str, float]:
    from edgetune.quickstart import held_out_accuracy

    return {task: held_out_accuracy(model_dir, adapter, rows)[0] for task, rows in records.items()}


def stacked_scores(model_dir: Path, runs: dict[str, Path], records: dict, work: Path) -> dict:
    """Exact match with both adapter GGUFs applied at scale 1 over the f16 base in llama.cpp."""
    from edgetune.export.gguf import write_adapter_gguf, write_gguf
    from edgetune.export.llama import load_llama
    from edgetune.export.run import reply
    from edgetune.records import prompt_messages

    ggufs = work / "gguf"
    ggufs.mkdir(exist_ok=True)
    if not (ggufs / "base-f16.gguf").is_file():
        write_gguf(model_dir, ggufs / "base-f16.gguf", "f16")
    for task, run in runs.items():
        write_adapter_gguf(model_dir, run, ggufs / f"{task}.gguf")
    adapters = [(ggufs / f"{task}.gguf", 1.0) for task in runs]
    llm = load_llama(ggufs / "base-f16.gguf", n_ctx=512, adapters=adapters, logits_all=False)
    scores = {}
    try:
        for task, rows in records.items():
            hits = sum(reply(llm, prompt_messages(r, "alpaca")[0]["content"], max_tokens=16)
                       == r["output"].strip() for r in rows)
            scores[task] = hits / len(rows)
    finally:
        llm.close()
    return scores


def measure(work: Path, eval_size: int, threads: int, fresh: bool) -> dict:
    """Every row of the table, each saved to DIR/results.json as soon as it is measured."""
    saved = work / "results.json"
    results = {} if fresh or not saved.is_file() else json.loads(saved.read_text())
    import torch

    torch.set_num_threads(threads)  # the scoring too: on a busy machine OpenMP's waiting dominates
    runs = train_adapters(work)
    records = held_out(work, eval_size)
    model_dir = smollm2_dir()

    def keep(name: str, row: dict) -> None:
        results[name] = row
        # the table can be printed from what is kept so far (--table), so the meta goes in each time
        results["_meta"] = {"eval_size": eval_size, "threads": threads,
                            "base_checkpoint_bytes": sum(f.stat().st_size
                                                         for f in model_dir.glob("*.safetensors")),
                            "load_average": os.getloadavg()}
        saved.write_text(json.dumps(results, indent=2) + "\n")
        print(f"  {name}: {json.dumps(row)}", flush=True)

    for task, run in runs.items():
        if f"{task} adapter alone" not in results:
            keep(f"{task} adapter alone", {"scores": torch_scores(model_dir, run, records)})

    def merged(rows: dict) -> None:
        for name, flags in rows.items():
            out = work / "merged" / re.sub(r"\W+", "-", name).strip("-")
            if name not in results:
                row = run_merge(runs, flags, out, threads)
                keep(name, {**row, "scores": torch_scores(model_dir, out, records)})
            elif results[name].get("rss_by") != "/usr/bin/time":  # an older row's cost: again
                keep(name, {**results[name], **run_merge(runs, flags, out, threads)})

    merged(MERGES)
    if STACK not in results:
        keep(STACK, {"scores": stacked_scores(model_dir, runs, records, work)})
    merged(LATER)
    if "base model" not in results:  # last: the table's rows that matter come first
        keep("base model", {"scores": torch_scores(model_dir, None, records)})
    return results


def table(results: dict) -> str:
    """The markdown table: exact match on both tasks, kept share of each single adapter, cost."""
    meta = results["_meta"]
    single = {task: results[f"{task} adapter alone"]["scores"][task] for task in TASKS}
    lines = ["| adapter | dates EM | fields EM | dates kept | fields kept | rank | energy kept "
             "(min / median) | merge wall s | merge CPU s | peak RSS MiB (predicted) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        if name.startswith("_"):
            continue
        scores = row["scores"]
        kept = [f"{scores[t] / single[t]:.0%}" if single[t] else "-" for t in TASKS]
        cost = ["-"] * 5
        if "rank" in row:
            predicted = f" ({row['predicted_peak'] / 2**20:.0f})" if row.get("predicted_peak") else ""
            cost = [str(row["rank"]), f"{row['energy_min']:.1%} / {row['energy_median']:.1%}",
                    f"{row['wall_s']:.1f}", f"{row['cpu_s']:.1f}",
                    f"{row['peak_rss'] / 2**20:.0f}{predicted}"]
        lines.append(f"| {name} | {scores['dates']:.0%} | {scores['fields']:.0%} | {kept[0]} | "
                     f"{kept[1]} | " + " | ".join(cost) + " |")
    base = meta["base_checkpoint_bytes"] / 2**20
    lines.append(f"\nheld-out records per task: {meta['eval_size']}; merges with --threads "
                 f"{meta['threads']}; base checkpoint {base:.0f} MiB on disk; load average "
                 f"{', '.join(f'{x:.1f}' for x in meta['load_average'])}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/edgetune-merge-bench", help="working folder")
    parser.add_argument("--eval-size", type=int, default=100, help="held-out records per task")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each merge and of the scoring")
    parser.add_argument("--fresh", action="store_true", help="measure every row again")
    parser.add_argument("--table", action="store_true",
                        help="print the table of the rows measured so far, measuring nothing")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.table:
        results = json.loads((work / "results.json").read_text())
    else:
        results = measure(work, args.eval_size, args.threads, args.fresh)
    print("\n" + table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
