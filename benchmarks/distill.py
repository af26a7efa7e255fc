"""Distillation from a llama.cpp teacher: does the student learn the teacher's skill from prompts alone?

Teacher: SmolLM2-135M fine-tuned by the quick start (ISO dates) and exported as q8_0 GGUF. Student:
the untuned SmolLM2-135M, given only the quick start's training prompts (no answers). Held-out exact
match of the teacher (its GGUF in llama.cpp), the base, the student by logits and the student by
sequences (equal steps), the teacher pass's time and tokens/s beside `edgetune run`'s decode speed.

    python benchmarks/distill.py --work /tmp/distill-bench [--steps 40] [--eval-size 100]

The quick start's folder in --work is reused when it is there (--fresh makes it again). Prints one
JSON object and a markdown table.
"""

import argparse
import json
import time
from pathlib import Path


def quickstart(work: Path, steps: int, eval_size: int, fresh: bool) -> dict:
    from edgetune import cli
    from edgetune.runfiles import QUICKSTART_RESULT

    out = work / "quickstart"
    result = out / QUICKSTART_RESULT
    if fresh or not result.is_file() or json.loads(result.read_text()).get("status") != "done":
        assert cli.main(["quickstart", "--output", str(out), "--steps", str(steps),
                         "--eval-size", str(eval_size), "--no-progress"]) == 0
    return json.loads(result.read_text())


def prompts_only(train_file: Path, out: Path) -> Path:
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "output"}) + "\n"
                           for r in rows))
    return out


def teacher_exact_match(gguf: Path, held_out: list[dict]) -> float:
    """The teacher GGUF's own answers through llama.cpp (greedy), as `edgetune run` gives them."""
    from edgetune.export.run import answer

    hits = sum(answer(gguf, f"{r['instruction']}\n\n{r['input']}", max_tokens=16) == r["output"]
               for r in held_out)
    return hits / len(held_out)


def decode_speed(gguf: Path, model_dir: Path) -> float:
    """`edgetune run`'s decode speed on this machine (llama.cpp, greedy, after a short prompt)."""
    from transformers import AutoTokenizer

    from edgetune.export.llama import gguf_logits

    ids = AutoTokenizer.from_pretrained(model_dir)("The capital of France is")["input_ids"]
    return gguf_logits(gguf, list(ids))[1]


def distill(mode: str, teacher: Path, prompts: Path, out: Path, steps: int, cache: Path) -> dict:
    from edgetune.distill.command import RECORD
    from edgetune.distill.command import main as distill_main
    from edgetune.distill.config import DistillConfig

    started = time.perf_counter()
    config = DistillConfig(model="smollm2-135m", teacher=str(teacher), data=str(prompts),
                           output=str(out), force=True, mode=mode, steps=steps, batch_size=8,
                           lr=1e-3, seq_len=256, eval_split=0.0, save_every=0, eval_every=0,
                           max_new_tokens=16, cache_dir=str(cache), progress=False)
    assert distill_main(config) == 0
    record = json.loads((out / RECORD).read_text())
    return {**record, "wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    from edgetune import models
    from edgetune.quickstart import held_out_accuracy
    from edgetune.runfiles import CHAT_TEMPLATE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40, help="quick start and student steps")
    parser.add_argument("--eval-size", type=int, default=100)
    parser.add_argument("--fresh", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    qs = quickstart(args.work, args.steps, args.eval_size, args.fresh)
    root = args.work / "quickstart"
    gguf = Path(qs["gguf"])
    held_out = [json.loads(line) for line in (root / "data" / "eval.jsonl").read_text().splitlines()]
    held_out = held_out[:args.eval_size]
    prompts = prompts_only(root / "data" / "train.jsonl", args.work / "prompts.jsonl")
    cache = args.work / "cache"
    for stale in cache.glob("distill/*"):  # time the teacher pass, not a cache hit
        stale.unlink()
    model_dir = models.resolve("smollm2-135m")
    results = {"steps": args.steps, "held_out": len(held_out), "base": qs["base_exact_match"],
               "teacher_torch": qs["tuned_exact_match"]}
    results["teacher_gguf"] = teacher_exact_match(gguf, held_out)
    results["decode_tokens_per_s"] = round(decode_speed(gguf, model_dir), 1)
    for mode in ("logits", "sequences"):
        run = args.work / f"student-{mode}"
        record = distill(mode, gguf, prompts, run, args.steps, cache)
        template = (run / CHAT_TEMPLATE).read_text() if (run / CHAT_TEMPLATE).is_file() else None
        results[f"student_{mode}"], _ = held_out_accuracy(model_dir, run, held_out, template)
        results[f"record_{mode}"] = record
    print(json.dumps(results, indent=2))
    table(results)


def table(r: dict) -> None:
    teacher = r["teacher_gguf"]
    print(f"\n| model ({r['held_out']} held-out dates, {r['steps']} steps) | exact match | of teacher |")
    print("|---|---:|---:|")
    for name, key in (("teacher (quick start, q8_0 GGUF in llama.cpp)", "teacher_gguf"),
                      ("base SmolLM2-135M", "base"), ("student by logits (top-64, KL + 0.5 CE)",
                                                      "student_logits"),
                      ("student by sequences", "student_sequences")):
        share = f"{r[key] / teacher:.0%}" if teacher else "-"
        print(f"| {name} | {r[key]:.0%} | {share} |")
    passed = r["record_logits"]["teacher_pass"]
    wrote = next(iter(r["record_logits"]["responses"].values()))
    print(f"\nteacher pass (top-64 over {passed['tokens']} tokens): {passed['seconds']} s, "
          f"{passed['tokens_per_s']} tokens/s; teacher responses: {wrote['seconds']} s; "
          f"`edgetune run` decode: {r['decode_tokens_per_s']} tokens/s")


if __name__ == "__main__":
    main()
