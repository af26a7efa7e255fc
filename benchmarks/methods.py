"""Every --method on the built-in tasks: what it learns, what it costs, and where it can be exported.

    python benchmarks/methods.py [--tasks dates,fields] [--methods lora,dora,...] [--work DIR]
                                 [--results FILE] [--exports] [--report] [--force] [--threads N]
                                 [--steps N]
    python benchmarks/methods.py --speed REPEATS --methods lora,dora [--threads N]

Per task (edgetune.examples.dates, the quick start's; edgetune.examples.fields, name and city
extraction) and method: held-out exact match of the shipped SmolLM2-135M before and after training
(edgetune.quickstart.held_out_accuracy, the quick start's own scorer), trainable parameters, the
adapter's size on disk, the training process's peak RSS (wait4), median tokens/s, and with --exports
which export formats work (each tried alone through `edgetune export`, verified as usual), plus, for
soft prompts, whether llama.cpp gives the same greedy answers as torch on held-out prompts. Each
training run is a fresh process; results are saved after each one, so an interrupted benchmark
continues where it stopped (--force measures again).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import median, run_train, smollm2_dir  # noqa: E402

from edgetune.methods import METHODS  # noqa: E402

# The quick start's budget is 40 steps of 8 at lr 1e-3. Methods that train few parameters from a
# neutral start take larger steps: IA3 scales start at 1, soft prompts at token embeddings.
BUDGETS = {  # method: (steps, lr)
    "lora": (40, 1e-3), "dora": (40, 1e-3), "rslora": (40, 1e-3), "adalora": (40, 1e-3),
    "ia3": (40, 1e-2), "prompt": (40, 3e-2), "ptuning": (40, 3e-3), "prefix": (40, 1e-2),
}
BATCH, SEQ_LEN, EVAL_SIZE = 8, 256, 100
EXPORTS = {  # format: export flags
    "gguf q8_0": ["--gguf", "q8_0"], "gguf adapter": ["--gguf-adapter"], "onnx int8": ["--onnx", "int8"]}
SAME_ANSWERS = 20  # held-out prompts answered by torch and by llama.cpp with a soft prompt


def task_files(task: str, work: Path) -> tuple[Path, Path]:
    from edgetune.examples import dates, fields

    return {"dates": dates, "fields": fields}[task].write(work / f"data-{task}")


def held_out(eval_file: Path) -> list[dict]:
    return [json.loads(line) for line in eval_file.read_text().splitlines()][:EVAL_SIZE]


def trainable_params(name: str, steps: int) -> int:
    """The exact trainable count of `name` on SmolLM2-135M, built as `edgetune train` builds it."""
    import torch

    from edgetune.train.adapters import peft_config
    from edgetune.train.config import TrainConfig
    from edgetune.train.model import add_adapter, load_base, parameter_counts

    config = TrainConfig(data="unused.jsonl", method=name)
    model = add_adapter(load_base(smollm2_dir(), torch.float32, "cpu"), peft_config(config, steps), 0,
                        False, fuse=False, method_name=name)
    return parameter_counts(model)[0]


def train_one(task: str, name: str, work: Path, threads: int | None, steps: int | None) -> dict:
    from edgetune.quickstart import held_out_accuracy

    budget, lr = BUDGETS[name]
    steps = steps or budget
    train_file, eval_file = task_files(task, work)
    run = work / f"run-{task}-{name}"
    args = ["--model", "smollm2-135m", "--data", str(train_file), "--eval-data", str(eval_file),
            "--method", name, "--steps", str(steps), "--batch-size", str(BATCH), "--lr", str(lr),
            "--seq-len", str(SEQ_LEN), "--eval-every", "0"]
    args += ["--threads", str(threads)] if threads else []
    trained = run_train(args, run)
    accuracy, answers = held_out_accuracy(smollm2_dir(), run, held_out(eval_file))
    return {"steps": steps, "lr": lr, "batch": BATCH, "tuned_exact_match": accuracy,
            "answers": answers[:10], "peak_rss": trained["peak_rss"], "wall_s": trained["wall_s"],
            "tokens_per_s": median([r["tokens_per_s"] for r in trained["log"][1:]]),
            "eval_loss": trained["log"][-1].get("eval_loss"),
            "adapter_bytes": (run / "adapter_model.safetensors").stat().st_size,
            "trainable_params": trainable_params(name, steps), "run": str(run)}


def base_accuracy(task: str, work: Path) -> float:
    from edgetune.quickstart import held_out_accuracy

    return held_out_accuracy(smollm2_dir(), None, held_out(task_files(task, work)[1]))[0]


def try_exports(run: Path, work: Path) -> dict:
    """{format: "ok" or the one-line refusal or failure} for each format tried alone."""
    outcome = {}
    for fmt, flags in EXPORTS.items():
        out = work / "export"
        command = [sys.executable, "-m", "edgetune", "export", str(run), "--output", str(out),
                   "--force", *flags]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stderr.splitlines() if line.startswith("edgetune:")]
        outcome[fmt] = "ok" if done.returncode == 0 else (lines[-1] if lines else done.stderr[-300:])
    return outcome


def same_answers(run: Path, eval_file: Path, work: Path) -> dict:
    """Greedy answers of the torch model with the soft prompt against llama.cpp's, prompt by prompt."""
    from edgetune.export.run import torch_and_llama_answers

    out = work / "export-soft"
    subprocess.run([sys.executable, "-m", "edgetune", "export", str(run), "--output", str(out),
                    "--force", "--gguf", "q8_0,f16"], check=True, capture_output=True)
    records = held_out(eval_file)[:SAME_ANSWERS]
    result = {}
    for kind in ("f16", "q8_0"):
        pairs = torch_and_llama_answers(run, out / f"base-{kind}.gguf", out / "soft-prompt.safetensors",
                                        records)
        result[kind] = {"same": sum(a == b for a, b in pairs), "of": len(pairs),
                        "examples": pairs[:3]}
    return result


def step_times(names: list[str], repeats: int, work: Path) -> dict:
    """Seconds per optimizer step of each method, the methods' steps interleaved in one process
    (the same batch of 8 quick-start examples, packed as the trainer packs it), so that they share
    the machine's load; the first step of each is left out as warm-up."""
    import time

    import torch
    from transformers import AutoTokenizer

    from edgetune.records import read_jsonl
    from edgetune.train.adapters import hooks, peft_config
    from edgetune.train.attention import use_segment_attention
    from edgetune.train.config import TrainConfig
    from edgetune.train.data import Batches, encode
    from edgetune.train.loss import causal_lm_loss
    from edgetune.train.model import add_adapter, load_base

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    examples = encode(tokenizer, *read_jsonl(str(task_files("dates", work)[0])))
    models, batches = {}, {}
    for name in names:  # "dora-peft": DoRA on PEFT's own forward, for what the fused layers save
        method = name.removesuffix("-peft")
        config = TrainConfig(data="unused.jsonl", method=method)
        model = add_adapter(load_base(smollm2_dir(), torch.float32, "cpu"), peft_config(config, 40), 0,
                            False, fuse=METHODS[method].fused and method == name, method_name=method)
        packs = hooks(model, method).packs
        if packs:
            use_segment_attention(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        models[name] = (model, optimizer)
        batches[name] = Batches(examples, BATCH, 0, tokenizer.pad_token_id, packed=packs).next()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats + 1):
        for name in names:
            model, optimizer = models[name]
            start = time.perf_counter()
            loss, n = causal_lm_loss(model, batches[name])
            (loss / n).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": median(t[1:]), "steps_s": t[1:]} for name, t in times.items()}


def report_speed(times: dict) -> None:
    lora = times.get("lora", {}).get("median_s")
    for name, entry in times.items():
        spread = f"{min(entry['steps_s']):.2f}-{max(entry['steps_s']):.2f}"
        ratio = f"{entry['median_s'] / lora:.2f}x LoRA" if lora else ""
        print(f"{name:<10}{entry['median_s']:>8.2f} s/step (median of {len(entry['steps_s'])}, "
              f"{spread})  {ratio}")


def report(results: dict, tasks: list[str], names: list[str]) -> None:
    print(f"\n{'task':<8}{'method':<9}{'steps':>6}{'lr':>8}{'base':>6}{'tuned':>7}{'gain':>6}"
          f"{'trainable':>12}{'adapter':>11}{'peak RSS':>10}{'tok/s':>7}  exports")
    for task in tasks:
        base = results.get(f"base:{task}")
        for name in names:
            r = results.get(f"{task}:{name}")
            if r is None or base is None:
                continue
            exports = results.get(f"exports:{name}", {}) if task == "dates" else {}
            works = ", ".join(f for f, v in exports.items() if v == "ok") or "-"
            print(f"{task:<8}{name:<9}{r['steps']:>6}{r['lr']:>8.0e}{base:>6.0%}"
                  f"{r['tuned_exact_match']:>7.0%}{100 * (r['tuned_exact_match'] - base):>+6.0f}"
                  f"{r['trainable_params']:>12,}{r['adapter_bytes'] / 2**20:>8.2f} MiB"
                  f"{r['peak_rss'] / 2**30:>6.2f} GiB{r['tokens_per_s']:>7.0f}  {works}")
    for name in names:
        for fmt, value in results.get(f"exports:{name}", {}).items():
            if value != "ok":
                print(f"  {name} {fmt}: {value}")
        same = results.get(f"answers:{name}")
        if same:
            print(f"  {name} soft prompt in llama.cpp: " + ", ".join(
                f"{k} {v['same']}/{v['of']} same greedy answers" for k, v in same.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="dates,fields")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "edgetune-methods"))
    parser.add_argument("--results", default=None, help="default: WORK/results.json")
    parser.add_argument("--exports", action="store_true", help="also try every export format "
                        "on each dates run, and compare soft-prompt answers with llama.cpp's")
    parser.add_argument("--report", action="store_true", help="only re-print the saved results")
    parser.add_argument("--force", action="store_true", help="measure again what was measured")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for training and "
                        "scoring (default: all cores)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of every method "
                        "instead of its budget (the smallest count that shows the gain)")
    parser.add_argument("--speed", type=int, default=0, metavar="REPEATS",
                        help="instead, time REPEATS interleaved steps of each of --methods in one "
                        "process and print each method's step time against LoRA's")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_file = Path(args.results or work / "results.json")
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    tasks, names = args.tasks.split(","), args.methods.split(",")

    if args.speed:
        times = step_times(names, args.speed, work)
        results_file.with_name("speed.json").write_text(json.dumps(times, indent=2))
        report_speed(times)
        return

    def measure(key: str, produce) -> None:
        if key in results and not args.force:
            return
        results[key] = produce()
        results_file.write_text(json.dumps(results, indent=2))
        print(f"{key}: {json.dumps(results[key])[:300]}", flush=True)

    if not args.report:
        for task in tasks:
            measure(f"base:{task}", lambda: base_accuracy(task, work))
            for name in names:
                measure(f"{task}:{name}", lambda: train_one(task, name, work, args.threads, args.steps))
        if args.exports:
            for name in names:
                run = Path(results[f"dates:{name}"]["run"])
                measure(f"exports:{name}", lambda: try_exports(run, work))
                if METHODS[name].soft_prompt:
                    eval_file = task_files("dates", work)[1]
                    measure(f"answers:{name}", lambda: same_answers(run, eval_file, work))
    report(results, tasks, names)


if __name__ == "__main__":
    main()
