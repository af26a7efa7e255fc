"""`edgetune quickstart`: the whole path on a built-in model, in minutes on a laptop CPU.

Teach SmolLM2-135M-Instruct (or `--model gemma3-270m`, a base model) to rewrite dates as ISO 8601,
score held-out dates by exact match before and after, export a q8_0 GGUF verified in llama.cpp, and
answer one held-out prompt through it. Both scores use the chat template the run trains with (for
the Gemma base model, the default `gemma` template).
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

from edgetune.config import as_dict, option
from edgetune.errors import EdgetuneError
from edgetune.runfiles import CHAT_TEMPLATE, QUICKSTART_RESULT

# The built-in models; one setting of steps and learning rate serves both (docs/gemma3.md).
MODELS = ("smollm2-135m", "gemma3-270m")


@dataclass(frozen=True)
class QuickstartConfig:
    output: str = option("edgetune-quickstart", "folder for the data, the run and the export; "
                         "a quick start's own folder is replaced, any other is refused")
    model: str = option("smollm2-135m", "built-in model to fine-tune", choices=MODELS)
    steps: int = option(40, "optimizer steps of LoRA training")
    batch_size: int = option(8, "examples per step")
    lr: float = option(1e-3, "peak learning rate")
    eval_size: int = option(100, "held-out dates scored before and after training")
    gguf: str = option("q8_0", "GGUF type to export and run")
    cache_dir: str | None = option(None, "model cache (default: $EDGETUNE_CACHE or ~/.cache/edgetune)")
    threads: int | None = option(None, "CPU threads for torch (default: all cores)")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_size < 1:
            raise EdgetuneError("--steps, --batch-size and --eval-size must be at least 1")


def held_out_accuracy(model_dir: Path, adapter: Path | None, records: list[dict],
                      template: str | None = None) -> tuple:
    """Exact-match accuracy of the base model, or of base + adapter, on alpaca records (in
    `template`, else the tokenizer's own chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgetune.train.evaluate import exact_match

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if template is not None:
        tokenizer.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from edgetune.train.model import load_adapter

        model = load_adapter(model, adapter)
    return exact_match(model, tokenizer, records, "alpaca", max_new_tokens=16)


def prepare_output(out: Path, config: QuickstartConfig) -> None:
    """Empty the quick start's own folder (call it holding the folder's lock) and mark it as ours.

    The folder ignores itself in git (a `.gitignore` of `*`), so running the quick start inside a
    repository adds nothing to it.
    """
    from edgetune import folders

    folders.inspect_output(out, folders.QUICKSTART_MARKERS)  # refuses a folder it did not make
    with folders.disk_errors(out):
        folders.clear(out)
        (out / ".gitignore").write_text("# written by edgetune quickstart\n*\n")
    started = {"status": "running", "config": as_dict(config)}
    folders.write_text_atomic(out / QUICKSTART_RESULT, json.dumps(started, indent=2) + "\n")


def main(config: QuickstartConfig) -> int:
    from edgetune import folders
    from edgetune.signals import stop_on_signals

    out = Path(config.output).expanduser()
    folders.inspect_output(out, folders.QUICKSTART_MARKERS)  # a user's folder: refused before work
    with folders.disk_errors(out.parent):
        out.mkdir(parents=True, exist_ok=True)
    with stop_on_signals(), folders.folder_lock(out, f"quick start folder {out}",
                                                verb="edgetune quickstart"):
        prepare_output(out, config)
        return _quickstart(config, out)


def _quickstart(config: QuickstartConfig, out: Path) -> int:
    from edgetune import folders, models
    from edgetune.examples import dates
    from edgetune.export.command import main as export_main
    from edgetune.export.config import ExportConfig
    from edgetune.export.run import answer
    from edgetune.train.command import train
    from edgetune.train.config import TrainConfig

    began = time.perf_counter()
    model_dir = models.resolve(config.model, config.cache_dir)
    train_file, eval_file = dates.write(out / "data")
    held_out = [json.loads(line) for line in eval_file.read_text().splitlines()][:config.eval_size]
    run = out / "run"
    summary = train(TrainConfig(
        model=config.model, data=str(train_file), eval_data=str(eval_file), output=str(run),
        force=True, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
        seq_len=256, save_every=0, eval_every=0, cache_dir=config.cache_dir,
        threads=config.threads, progress=config.progress))
    if summary.interrupted:
        stopped = {"status": "interrupted", "steps": summary.steps, "config": as_dict(config)}
        folders.write_text_atomic(out / QUICKSTART_RESULT, json.dumps(stopped, indent=2) + "\n")
        folders.say(f"interrupted at step {summary.steps}; run edgetune quickstart again to start over")
        return summary.exit_status
    template_file = run / CHAT_TEMPLATE
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
    print(f"edgetune: scoring the base model on {len(held_out)} held-out dates")
    before, _ = held_out_accuracy(model_dir, None, held_out, template)
    print(f"edgetune: base model exact match: {before:.0%}")
    after, answers = held_out_accuracy(model_dir, run, held_out, template)
    export_dir = out / "export"
    export_main(ExportConfig(run=str(run), output=str(export_dir), force=True, gguf=config.gguf,
                             cache_dir=config.cache_dir))
    gguf_file = next(export_dir.glob(f"*{config.gguf}*.gguf"))
    sample = held_out[0]
    prompt = f"{sample['instruction']}\n\n{sample['input']}"
    reply = answer(gguf_file, prompt, max_tokens=16)
    result = {"base_exact_match": before, "tuned_exact_match": after, "gain_points":
              round(100 * (after - before), 1), "steps": summary.steps, "eval_loss": summary.eval_loss,
              "tokens_per_s": round(summary.tokens_per_s, 1), "gguf": str(gguf_file),
              "llama_cpp_prompt": sample["input"], "llama_cpp_answer": reply,
              "expected": sample["output"], "seconds": round(time.perf_counter() - began),
              "status": "done", "config": as_dict(config)}
    folders.write_text_atomic(out / QUICKSTART_RESULT, json.dumps(result, indent=2) + "\n")
    print(f"\nheld-out exact match: base {before:.0%} -> tuned {after:.0%} "
          f"({result['gain_points']:+.0f} points) after {summary.steps} steps")
    print(f"llama.cpp ({gguf_file.name}): {sample['input']!r} -> {reply!r} (expected {sample['output']})")
    print(f"edgetune: quick start done in {result['seconds'] / 60:.1f} min; results in {out}")
    return 0
