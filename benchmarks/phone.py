"""Phone-native files of SmolLM2-135M: size, fidelity, decode speed and export time, per type.

    python benchmarks/phone.py [--executorch fp32,8da4w,8da8w] [--litert fp32,int8,int4] [--ctx 2048]
                               [--model smollm2-135m] [--out DIR]
    python benchmarks/phone.py --recipes dynamic_wi8_afp32,weight_only_wi8_afp32 --bundle model-fp32.litertlm
    python benchmarks/phone.py --speed DIR [--repeats 3]
    python benchmarks/phone.py --torch-quant 8da4w,8da8w

Runs `edgetune export` once per runtime in a fresh process (its wall and CPU seconds come from wait4) and
prints each file's row of report.json: size, top-1 agreement with torch step by step, mean KL divergence,
perplexity ratio, the runtime's decode tokens/s, its chat reply, and the goals of docs/phone.md (fp32
top-1 100%; 8da4w and LiteRT int8 perplexity ratio <= 1.05 with a correct chat answer). The load average
is printed beside each run: on a shared machine the CPU seconds are the steadier figure.

--recipes compares ai-edge-quantizer recipes on the fp32 program of an exported bundle, step by step in
LiteRT against torch on the same held-out text: how the LiteRT types were chosen.

--speed times decoding of every .pte and .litertlm under DIR through each runtime's own generation API
(ExecuTorch's TextLLMRunner, LiteRT-LM's Conversation; 32 greedy tokens of a story), interleaved and
repeated, and prints the medians.

--torch-quant quantizes the torch model with torchao as the ExecuTorch export does and measures it in
torch on the same held-out ids (top-1, mean KLD, perplexity ratio) with its greedy chat reply: the
quantization's own loss, which no export of that type can undo.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_PPL_RATIO = 1.05


def export(model: str, out: Path, flag: str, types: str, ctx: int) -> dict:
    """`edgetune export MODEL --<flag> TYPES` in a fresh process: wall and CPU seconds, load."""
    command = [sys.executable, "-m", "edgetune", "export", model, f"--{flag}", types, "--ctx", str(ctx),
               "--output", str(out), "--force"]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    output = child.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {"wall_s": time.perf_counter() - started, "cpu_s": usage.ru_utime + usage.ru_stime,
            "load_before": load, "load_after": os.getloadavg()[0], "output": output,
            "rows": json.loads((out / "report.json").read_text())}


def mean_kld(row: dict) -> float | None:
    if "kld_mean" in row:
        return row["kld_mean"]
    found = re.search(r"mean KLD ([0-9.e+-]+) nats", row["note"])
    return float(found.group(1)) if found else None


def chat(row: dict) -> str:
    found = re.search(r"chat: ('.*?'|\".*?\")( \(torch's reply\))?", row["note"])
    return (found.group(1) + (" = torch" if found.group(2) else "")) if found else "-"


def print_rows(rows: list[dict]) -> None:
    print("| file | size | top-1 | mean KLD | ppl ratio | decode tok/s | chat reply | goal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        kind = r["format"].split()[-1]
        if kind == "fp32":
            goal = "met" if r["top1_agreement"] == 1.0 and r["passed"] else "NOT met"
        elif kind in ("8da4w", "int8"):
            goal = ("met" if r["perplexity_ratio"] <= GOAL_PPL_RATIO and "Paris" in chat(r)
                    else "NOT met")
        else:
            goal = "-"
        kld = mean_kld(r)
        tps = f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-"
        print(f"| {r['format']} | {r['size_bytes'] / 2**20:.1f} MiB | {r['top1_agreement']:.1%} | "
              f"{kld:.2e} | {r['perplexity_ratio']:.3f} | {tps} | {chat(r)} | {goal} |"
              if kld is not None else f"| {r['format']} | ... |")


def compare_recipes(bundle: Path, recipes: list[str], model: str) -> None:
    """Each recipe applied to `bundle`'s fp32 program: size, top-1, mean KLD, perplexity ratio, steps/s."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import numpy as np
    from transformers import AutoTokenizer

    from edgetune import models
    from edgetune.export.heldout import held_out_ids
    from edgetune.export.litert import _quantize
    from edgetune.export.litert_runtime import Program, tflite_bytes
    from edgetune.export.phone import kl_divergence
    from edgetune.export.verify import torch_reference
    from edgetune.metrics import perplexity

    model_dir = models.resolve(model)
    ids = held_out_ids(AutoTokenizer.from_pretrained(model_dir), [], 256)
    reference = torch_reference(model_dir, ids)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.tflite"
        fp32.write_bytes(tflite_bytes(bundle))
        print("| recipe | size | top-1 | mean KLD | ppl ratio | LiteRT steps/s |\n|---|---|---|---|---|---|")
        for recipe in recipes:
            program = _quantize(fp32, None if recipe == "none" else recipe)
            runner = Program(program.read_bytes())
            started = time.perf_counter()
            logits = np.stack([runner.decode(t, i) for i, t in enumerate(ids[:-1])])
            rate = (len(ids) - 1) / (time.perf_counter() - started)
            top1 = float((logits.argmax(-1) == reference.logits.argmax(-1)).mean())
            ratio = perplexity(logits, ids[1:]) / reference.perplexity
            print(f"| {recipe} | {program.stat().st_size / 2**20:.1f} MiB | {top1:.1%} | "
                  f"{kl_divergence(reference.logits, logits).mean():.4f} | {ratio:.3f} | {rate:.1f} |")


def torch_quantization(kinds: list[str], model: str) -> None:
    """The loss of torchao's ExecuTorch types in plain torch, before any export: what a .pte of that
    type can at best reach (the same held-out ids and chat question as verification)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgetune import models
    from edgetune.export import phone
    from edgetune.export.executorch import _quantize
    from edgetune.export.gate import distance
    from edgetune.export.heldout import held_out_ids
    from edgetune.export.verify import torch_reference
    from edgetune.metrics import perplexity

    model_dir = models.resolve(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = held_out_ids(tokenizer, [], 256)
    reference = torch_reference(model_dir, ids)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": phone.CHAT_QUESTION}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    print(f"load average {os.getloadavg()[0]:.1f} (2 cores)\n| type (torch, not exported) | top-1 | "
          "mean KLD | ppl ratio | greedy chat reply |\n|---|---|---|---|---|")
    for kind in kinds:
        net = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        _quantize(net, kind)
        with torch.no_grad():
            logits = net(torch.tensor([ids])).logits[0, :-1].float().numpy()
            out = net.generate(prompt, max_new_tokens=phone.CHAT_TOKENS, do_sample=False)
        d = distance(logits, reference.logits)
        reply = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()
        print(f"| {kind} | {d.top1.mean():.1%} | {d.kld.mean():.4f} | "
              f"{perplexity(logits, ids[1:]) / reference.perplexity:.3f} | {reply!r} |")


STORY = "Write a short story about a robot who learns to paint."


def decode_speeds(root: Path, repeats: int, model: str) -> None:
    """Median decode tokens/s of each file under `root` in its runtime, runs interleaved."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import AutoTokenizer

    from edgetune import models
    from edgetune.export import phone
    from edgetune.export.executorch import runner_chat
    from edgetune.export.litert_runtime import converse

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(model))
    messages = [{"role": "user", "content": STORY}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat = phone.Chat(messages, prompt, 0, "", ["<|im_end|>"], phone.stop_ids(tokenizer))
    files = sorted(root.glob("**/model.pte")) + sorted(root.glob("**/*.litertlm"))
    speeds: dict = {f: [] for f in files}
    loads = []
    for _ in range(repeats):
        for file in files:
            loads.append(os.getloadavg()[0])
            with phone.native_output():
                _, _, rate = runner_chat(file, chat) if file.suffix == ".pte" else converse(file, chat)
            speeds[file].append(rate or float("nan"))
    print(f"load average {min(loads):.1f}-{max(loads):.1f} (2 cores)\n| file | decode tok/s (median of "
          f"{repeats}) | runs |\n|---|---|---|")
    for file, rates in speeds.items():
        runs = ", ".join(f"{r:.1f}" for r in rates)
        print(f"| {file.relative_to(root)} | {sorted(rates)[len(rates) // 2]:.1f} | {runs} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--executorch", default="fp32,8da4w,8da8w")
    parser.add_argument("--litert", default="fp32,int8,int4")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None, help="keep the exports here")
    parser.add_argument("--recipes", default="", help="compare ai-edge-quantizer recipes instead")
    parser.add_argument("--bundle", type=Path, help="an fp32 .litertlm (with --recipes)")
    parser.add_argument("--speed", type=Path, help="time decoding of the files under this folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-quant", default="", help="measure these ExecuTorch types in plain "
                        "torch instead (e.g. 8da4w,8da8w)")
    args = parser.parse_args()
    if args.torch_quant:
        torch_quantization(args.torch_quant.split(","), args.model)
        return
    if args.speed:
        decode_speeds(args.speed, args.repeats, args.model)
        return
    if args.recipes:
        compare_recipes(args.bundle, args.recipes.split(","), args.model)
        return
    root = args.out or Path(tempfile.mkdtemp(prefix="edgetune-phone-"))
    for flag in ("litert", "executorch"):
        types = getattr(args, flag)
        if not types:
            continue
        result = export(args.model, root / flag, flag, types, args.ctx)
        print(f"\n## --{flag} {types} (--ctx {args.ctx}): export {result['wall_s'] / 60:.1f} min wall, "
              f"{result['cpu_s'] / 60:.1f} min CPU; load average {result['load_before']:.1f} before, "
              f"{result['load_after']:.1f} after (2 cores)")
        print_rows(result["rows"])
        for row in result["rows"]:
            print(f"- {row['file']}: {row['note']}")
    print(f"\nexports in {root}")


if __name__ == "__main__":
    main()
