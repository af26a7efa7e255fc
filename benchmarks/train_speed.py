"""edgetune's trainer against transformers.Trainer + PEFT on instruction data and on dense text:
tokens/s, FLOP/s against the measured fp32 matmul peak, peak RSS, page faults, eval loss.

    python benchmarks/train_speed.py [--models smollm2-135m,qwen2.5-0.5b] [--cases instruction,dense]
                                     [--repeats 3] [--seq-len 512] [--threads 1 --busy]

Two kinds of data, measured in the same repeats:
- instruction: alpaca records whose responses are stdlib docstrings; only response tokens carry
  loss, and edgetune packs a micro-batch into one row where the reference pads it.
- dense: plain text records (docstrings run together), each filling --seq-len, every token
  labelled, as in continued pre-training or domain adaptation. No padding on either side and
  logits at every position: both sides do the same useful work.

Both sides train the same model, LoRA config and seed on the same examples in the same order (the
Trainer is fed the exact token ids and labels edgetune builds, batched the same way, padded by a
collator where lengths differ), with the same optimizer, schedule and clipping, in the dtype this CPU
runs natively (fp32 without AVX512-BF16). Each run is a fresh process: peak RSS is its maximum
resident set (wait4). Runs alternate between the sides and repeat; the tables show medians and
min-max spread, because the machine is shared, and the 1-minute load average around the runs.
tokens/s counts real (non-pad) tokens over the optimizer steps after the first --warmup ones: while
the C heap grows to its working size a step also pays for fresh pages (the page-fault column shows
the median per timed step), which a real run of hundreds of steps pays once. tok/CPU-s divides the
tokens of the same steps (but the last) by the process's CPU time: where other jobs take turns on the
cores, wall time counts their turns and CPU time does not, so on a loaded machine it is the steadier
of the two ratios (with more than one thread it also counts threads waiting at barriers).
Eval loss is computed the same way for both trained adapters (mean token loss on held-out records).

On a machine shared with other jobs, pass --threads 1: with one torch thread per core and more
runnable processes than cores, every parallel region waits for a descheduled thread. --busy starts a
second process doing single-threaded matmuls for the whole measurement, as a laptop running
something else would.
"""

import argparse
import importlib
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median, model_dir  # noqa: E402
from _speed_sides import child_edgetune, child_transformers  # noqa: E402

SIDES = ("edgetune", "transformers")
CASES = ("instruction", "dense")
MODULES = ["json", "os", "re", "collections", "itertools", "functools", "pathlib", "subprocess",
           "random", "statistics", "textwrap", "string", "shutil", "argparse", "datetime", "heapq",
           "csv", "dataclasses", "typing", "io", "threading", "socket", "zipfile", "tarfile",
           "difflib", "fractions", "decimal", "enum", "inspect", "tempfile", "logging", "pickle",
           "contextlib", "glob", "calendar", "uuid", "sqlite3", "gzip", "urllib.parse"]


def docstring_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca records with real English responses of varied length: stdlib docstrings."""
    records, seen = [], set()
    for name in MODULES:
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not attr.startswith("_") else None
            if doc and len(doc) >= 80 and doc not in seen:
                seen.add(doc)
                records.append({"instruction": f"Explain what `{name}.{attr}` does in Python.",
                                "input": "", "output": doc[:1800]})
    random.Random(seed).shuffle(records)
    return records[:n]


def docstring_texts(min_chars: int, seed: int = 0) -> list[dict]:
    """Text records of docstrings run together, each at least `min_chars` characters long."""
    records, current = [], []
    for doc in (r["output"] for r in docstring_records(10**6, seed)):
        current.append(doc)
        if sum(len(c) for c in current) >= min_chars:
            records.append({"text": "\n\n".join(current)})
            current = []
    return records


# ---- FLOPs --------------------------------------------------------------------------------------

def flops_per_step(config: dict, lengths: list[int], labelled: int, rank: int) -> float:
    """Useful FLOPs of one LoRA step over sequences of `lengths` with `labelled` label tokens.

    Frozen linear layers: forward 2P and input gradient 2P per token (no weight gradient; the first
    layer's q, k, v, gate and up projections need no input gradient either: the embeddings are
    frozen). LoRA:
    forward 2r(in+out), backward 4r(in+out) per token and module. Causal attention: QK^T and AV over
    the lower triangle, backward twice the forward. Output layer: forward and hidden-state gradient
    at labelled positions only (no other position needs logits). Padding and elementwise work are
    not counted, so a side that computes more than this gets no credit for it.
    """
    d, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or d // heads
    shapes = [(d, heads * head_dim), (d, kv * head_dim), (d, kv * head_dim),
              (heads * head_dim, d), (d, ffn), (d, ffn), (ffn, d)]
    params = sum(i * o for i, o in shapes)
    lora = sum(rank * (i + o) for i, o in shapes)
    tokens = sum(lengths)
    first_inputs = sum(i * o for i, o in shapes if i == d)  # the projections reading the embeddings
    linear = layers * tokens * (4 * params + 6 * lora) - tokens * 2 * first_inputs
    attention = layers * 3 * sum(4 * heads * head_dim * n * (n + 1) / 2 for n in lengths)
    head = labelled * 4 * d * config["vocab_size"]
    return linear + attention + head


def matmul_peak(dtype_name: str, m: int, k: int, n: int, repeats: int = 5,
                clock=time.perf_counter) -> float:
    """Best FLOP/s of an (m x k) @ (k x n) matmul in this process's thread setting, by `clock`."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = clock()
        a @ b
        best = min(best, clock() - started)
    return 2 * m * k * n / best


# ---- the parent: data, interleaved runs, table ----------------------------------------------------

def case_records(case: str, seq_len: int) -> tuple[str, list[dict], list[dict]]:
    """(format, train records, eval records) of one kind of data."""
    if case == "instruction":
        records = docstring_records(376)
        return "alpaca", records[:360], records[360:]
    # English runs at 3-5 characters a token, so 8 characters per token fills --seq-len.
    records = docstring_texts(8 * seq_len)
    return "text", records[:-16], records[-16:]


def prepare(model: Path, work: Path, settings: dict, case: str) -> dict:
    """Write the data and the exact per-step token rows both sides will see."""
    from transformers import AutoTokenizer

    from edgetune.train.data import SEGMENTS, Batches, encode, fit_to_length

    fmt, train_records, eval_records = case_records(case, settings["seq_len"])
    train_file, eval_file = work / "train.jsonl", work / "eval.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in train_records))
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in eval_records))
    tokenizer = AutoTokenizer.from_pretrained(model)
    template = None
    if not tokenizer.chat_template:  # a base model: both sides get edgetune's default template
        from edgetune import templates

        template = templates.default_for(tokenizer.get_vocab())
        tokenizer.chat_template = templates.TEMPLATES[template].jinja
    seq_len = settings["seq_len"]
    train = fit_to_length(encode(tokenizer, fmt, train_records), seq_len, "train")
    held = fit_to_length(encode(tokenizer, fmt, eval_records), seq_len, "eval")
    if case == "dense" and any(len(e.input_ids) != seq_len for e in train + held):
        raise RuntimeError(f"a dense-text record is shorter than --seq-len {seq_len}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = Batches(train, settings["batch"], settings["seed"], pad_id)
    steps, rows = [], []
    for _ in range(settings["steps"]):
        packed = batches.next()
        bounds, ids, labels = packed[SEGMENTS], packed["input_ids"][0], packed["labels"][0]
        for a, b in zip(bounds[:-1], bounds[1:]):
            rows.append((ids[a:b].tolist(), labels[a:b].tolist()))
        steps.append([(b - a, int((labels[a + 1:b] != -100).sum()))
                      for a, b in zip(bounds[:-1], bounds[1:])])
    return {"model": str(model), "train_file": str(train_file), "eval_file": str(eval_file),
            "settings": settings, "pad_id": pad_id, "train_rows": rows, "template": template,
            "eval_rows": [(e.input_ids, e.labels) for e in held],
            "step_counts": [sum(n for n, _ in s) for s in steps], "steps": steps}


def run_child(side: str, spec_file: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", side, "--spec", str(spec_file),
               "--result", str(out)]
    load = os.getloadavg()[0]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    output = child.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{side} run failed:\n{output[-3000:]}")
    result = json.loads(out.read_text())
    result["peak_rss"] = usage.ru_maxrss * 1024
    result["load"] = (load + os.getloadavg()[0]) / 2
    return result


def plan_case(model: Path, work: Path, settings: dict, case: str, config: dict) -> tuple:
    """Write one case's spec; return (timed tokens and FLOPs, an empty results entry)."""
    work.mkdir(exist_ok=True)
    spec = prepare(model, work, settings, case)
    spec["out"] = str(work / "run")
    (work / "spec.json").write_text(json.dumps(spec))
    timed = spec["steps"][settings["warmup"]:]
    plan = {"tokens": sum(n for step in timed for n, _ in step), "flops": sum(
        flops_per_step(config, [n for n, _ in step], sum(k for _, k in step), settings["rank"])
        for step in timed), "cpu_tokens": sum(spec["step_counts"][settings["warmup"]:-1])}
    results = {side: {k: [] for k in ("tokens_per_s", "cpu_tokens_per_s", "peak_rss", "eval_loss",
                                      "flops", "faults", "load")} for side in SIDES}
    results["per_token_flops"] = plan["flops"] / plan["tokens"]
    results["padding"] = 1 - plan["tokens"] / sum(max(n for n, _ in s) * len(s) for s in timed)
    return plan, results


def measure(name: str, model: Path, work: Path, settings: dict, repeats: int,
            cases: list[str]) -> dict:
    """{case: results}, the cases and sides interleaved within each repeat."""
    config = json.loads((model / "config.json").read_text())
    warmup = settings["warmup"]
    plans, results = {}, {}
    for case in cases:
        plans[case], results[case] = plan_case(model, work / case, settings, case, config)
    peaks, cpu_peaks = [], []
    d, ffn = config["hidden_size"], config["intermediate_size"]
    for rep in range(repeats):
        # The peak is measured between runs, in the same conditions, on a shape the model uses.
        peaks.append(matmul_peak("float32", 512, d, ffn))
        cpu_peaks.append(matmul_peak("float32", 512, d, ffn, clock=time.process_time))
        for case in cases:
            for side in (SIDES if rep % 2 == 0 else SIDES[::-1]):
                r = run_child(side, work / case / "spec.json", work / case / f"{side}.json")
                seconds = sum(r["seconds"][warmup:])
                entry = results[case][side]
                tokens_per_s = plans[case]["tokens"] / seconds
                entry["tokens_per_s"].append(tokens_per_s)
                entry["flops"].append(plans[case]["flops"] / seconds)
                entry["faults"].append(median(r["faults"][warmup:]))
                # CPU time leaves out the time other jobs held the core; the last step is left out
                # on both sides (edgetune's span for it would include the final eval).
                entry["cpu_tokens_per_s"].append(
                    plans[case]["cpu_tokens"] / sum(r["cpu_seconds"][warmup:len(r["seconds"]) - 1]))
                for key in ("peak_rss", "eval_loss", "load"):
                    entry[key].append(r[key])
                print(f"  {name} {case} rep {rep} {side}: {tokens_per_s:.1f} tok/s, "
                      f"{entry['cpu_tokens_per_s'][-1]:.1f} tok/CPU-s, "
                      f"{r['peak_rss'] / 2**30:.2f} GiB, eval loss {r['eval_loss']:.4f}, "
                      f"load {r['load']:.1f}", flush=True)
    for case in cases:
        results[case]["fp32 peak"], results[case]["fp32 CPU peak"] = peaks, cpu_peaks
    return results


def spread(values: list[float], fmt: str = ".1f") -> str:
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


def print_table(title: str, results: dict, bf16_peak: float) -> None:
    e, t = results["edgetune"], results["transformers"]
    # Against the best peak seen: load from other jobs lowers it, so the median can flatter.
    peak = max(results["fp32 peak"])
    print(f"\n{title}")
    print(f"{'':<14}{'tok/s med':>10}{'spread':>14}{'tok/CPU-s':>10}{'peak RSS GiB':>18}"
          f"{'eval loss':>11}{'GFLOP/s':>9}{'% fp32 peak':>12}{'faults/step':>12}{'load':>6}")
    for side, entry in (("edgetune", e), ("transformers", t)):
        rss = [v / 2**30 for v in entry["peak_rss"]]
        gf = median(entry["flops"]) / 1e9
        print(f"{side:<14}{median(entry['tokens_per_s']):>10.1f}{spread(entry['tokens_per_s']):>14}"
              f"{median(entry['cpu_tokens_per_s']):>10.1f}"
              f"{median(rss):>8.2f} ({spread(rss, '.2f')}){median(entry['eval_loss']):>11.4f}"
              f"{gf:>9.1f}{100 * gf * 1e9 / peak:>11.0f}%{median(entry['faults']):>12.0f}"
              f"{median(entry['load']):>6.1f}")
    speedup = median(e["tokens_per_s"]) / median(t["tokens_per_s"])
    cpu_speedup = median(e["cpu_tokens_per_s"]) / median(t["cpu_tokens_per_s"])
    print(f"ratios edgetune/transformers: tokens/s {speedup:.2f} (per CPU-second {cpu_speedup:.2f}), "
          f"peak RSS {median(e['peak_rss']) / median(t['peak_rss']):.2f}, "
          f"eval loss {median(e['eval_loss']) / median(t['eval_loss']):.4f}")
    print(f"useful work {results['per_token_flops'] / 1e9:.2f} GFLOP/token; padding in the "
          f"reference batches {results['padding']:.0%}; measured matmul peak fp32 "
          f"{peak / 1e9:.1f} GFLOP/s (best of {spread([p / 1e9 for p in results['fp32 peak']])}), "
          f"{max(results['fp32 CPU peak']) / 1e9:.1f} GFLOP/CPU-s, bf16 {bf16_peak / 1e9:.1f} GFLOP/s "
          f"(no AVX512-BF16: not used)")


def print_summary(rows: list[tuple[str, str, dict]]) -> None:
    """Both cases of every model side by side: the issue's figures in one table."""
    print("\nsummary: interleaved medians of tokens/s (wall) and tokens per CPU-second; shares of the "
          "best fp32 matmul peak seen, by wall time and by CPU time; load = 1-min average")
    print(f"{'model':<16}{'case':<13}{'edgetune':>10}{'reference':>11}{'speed-up':>10}"
          f"{'per CPU-s':>11}{'% peak e/ref':>14}{'% CPU peak':>12}{'RSS ratio':>11}"
          f"{'eval ratio':>12}{'load':>11}")
    for name, case, r in rows:
        e, t, peak = r["edgetune"], r["transformers"], max(r["fp32 peak"])
        shares = [100 * median(x["flops"]) / peak for x in (e, t)]
        cpu_shares = [100 * r["per_token_flops"] * median(x["cpu_tokens_per_s"])
                      / max(r["fp32 CPU peak"]) for x in (e, t)]
        loads = e["load"] + t["load"]
        print(f"{name:<16}{case:<13}{median(e['tokens_per_s']):>10.1f}"
              f"{median(t['tokens_per_s']):>11.1f}"
              f"{median(e['tokens_per_s']) / median(t['tokens_per_s']):>9.2f}x"
              f"{median(e['cpu_tokens_per_s']) / median(t['cpu_tokens_per_s']):>10.2f}x"
              f"{shares[0]:>8.0f}/{shares[1]:.0f}%"
              f"{cpu_shares[0]:>7.0f}/{cpu_shares[1]:.0f}%"
              f"{median(e['peak_rss']) / median(t['peak_rss']):>11.2f}"
              f"{median(e['eval_loss']) / median(t['eval_loss']):>12.4f}"
              f"{min(loads):>6.1f}-{max(loads):.1f}")


BUSY = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"


@contextmanager
def busy_process(enabled: bool):
    """A second process doing single-threaded matmuls while the block runs."""
    if not enabled:
        yield
        return
    process = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        yield
    finally:
        process.kill()
        process.wait()


def model_names(text: str) -> list[str]:
    from edgetune.plan.catalogue import CATALOGUE

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CATALOGUE]
    if unknown:
        raise SystemExit(f"unknown model {unknown[0]!r}; choose from {', '.join(CATALOGUE)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b",
                        help="smollm2-135m is the real model; other catalogue names are "
                             "random-initialised with their exact shape")
    parser.add_argument("--cases", default=",".join(CASES), help="instruction, dense or both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both sides (default: torch's, one per core)")
    parser.add_argument("--busy", action="store_true",
                        help="keep a second process busy with matmuls during the measurement")
    parser.add_argument("--steps", default="6,5", help="optimizer steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="leading steps left untimed")
    parser.add_argument("--batch", default="4,4", help="examples per step per model")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--work", default=None)
    parser.add_argument("--child", choices=SIDES)
    parser.add_argument("--spec")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.child:
        spec = json.loads(Path(args.spec).read_text())
        run = child_edgetune if args.child == "edgetune" else child_transformers
        Path(args.result).write_text(json.dumps(run(spec)))
        return
    import torch

    names, cases = model_names(args.models), [c.strip() for c in args.cases.split(",")]
    if min(int(n) for n in args.steps.split(",")) < args.warmup + 2:
        raise SystemExit("--steps must be at least --warmup + 2 (two timed steps)")
    if not set(cases) <= set(CASES):
        raise SystemExit(f"--cases: choose from {', '.join(CASES)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="edgetune-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, fp32 on both sides"
          f"{', a second process busy' if args.busy else ''}; load {os.getloadavg()[0]:.1f}")
    bf16_peak = matmul_peak("bfloat16", 256, 256, 256, repeats=2)
    steps, batches = args.steps.split(","), args.batch.split(",")  # the last value repeats
    summary = []
    with busy_process(args.busy):
        for i, name in enumerate(names):
            model = model_dir(name, work)
            settings = dict(batch=int(batches[min(i, len(batches) - 1)]),
                            steps=int(steps[min(i, len(steps) - 1)]), seq_len=args.seq_len,
                            rank=16, alpha=32.0, lr=2e-4, seed=0, threads=threads,
                            warmup=args.warmup)
            print(f"{name}: batch {settings['batch']}, {settings['steps']} steps, "
                  f"{args.repeats} repeats, cases {', '.join(cases)}", flush=True)
            (work / f"{name}-runs").mkdir(exist_ok=True)
            results = measure(name, model, work / f"{name}-runs", settings, args.repeats, cases)
            for case in cases:
                print_table(f"{name}, {case} (batch {settings['batch']}, seq-len "
                            f"{'=' if case == 'dense' else '<='} {args.seq_len}, rank 16 all-linear, "
                            f"{threads} threads, {settings['steps'] - args.warmup} timed steps)",
                            results[case], bf16_peak)
                summary.append((name, case, results[case]))
    print_summary(summary)


if __name__ == "__main__":
    main()
