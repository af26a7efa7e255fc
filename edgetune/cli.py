"""The `edgetune` command line: argument parsing and dispatch only.

Each verb's settings live in a light dataclass module; its work lives in a module imported only when
the verb runs, so `edgetune --help` and `edgetune plan` never import torch.
"""

import argparse
import importlib
import sys

from edgetune import __version__
from edgetune.config import add_arguments, build, overrides_from
from edgetune.errors import EdgetuneError

DESCRIPTION = ("Fine-tune a small language model on a laptop, small GPU or Raspberry Pi, "
               "and ship it to a phone or a Pi.")
# verb: (help, settings module and class, module with the verb's main(config))
VERBS = {
    "plan": ("choose training settings that fit a RAM or VRAM budget",
             "edgetune.plan.config:PlanConfig", "edgetune.plan.command"),
    "train": ("fine-tune a model with LoRA or QLoRA on JSONL data",
              "edgetune.train.config:TrainConfig", "edgetune.train.command"),
    "distill": ("train a student on a teacher's top-k log-probs or responses, the teacher in llama.cpp",
                "edgetune.distill.config:DistillConfig", "edgetune.distill.command"),
    "export": ("merge a run's adapter and write verified GGUF, ONNX, ExecuTorch or LiteRT-LM files",
               "edgetune.export.config:ExportConfig", "edgetune.export.command"),
    "merge": ("combine several LoRA runs into one adapter (linear, TIES, DARE, SVD, cat)",
              "edgetune.merge:MergeConfig", "edgetune.merge"),
    "run": ("chat with a GGUF model through llama.cpp",
            "edgetune.export.config:RunConfig", "edgetune.export.run"),
    "devices": ("list the device profiles export can target",
                "edgetune.devices.config:DevicesConfig", "edgetune.devices.command"),
    "report": ("summarise a run and its exports, and draw its training curves",
               "edgetune.report:ReportConfig", "edgetune.report"),
    "quickstart": ("train, evaluate, export and run the built-in demo end to end",
                   "edgetune.quickstart:QuickstartConfig", "edgetune.quickstart"),
    "cache": ("list or clear the models edgetune converted (GGUF to HF checkpoints)",
              "edgetune.cache:CacheConfig", "edgetune.cache"),
}


def _settings_class(verb: str) -> type:
    module, name = VERBS[verb][1].split(":")
    return getattr(importlib.import_module(module), name)


def parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only `verb`'s settings module is imported (and its flags added)."""
    top = argparse.ArgumentParser(prog="edgetune", description=DESCRIPTION)
    top.add_argument("--version", action="version", version=f"edgetune {__version__}")
    verbs = top.add_subparsers(dest="verb", metavar="VERB")
    for name, (help_text, _, _) in VERBS.items():
        sub = verbs.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            add_arguments(sub, _settings_class(name))
    return top


def _verb_in(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top = parser(_verb_in(argv))
    args = top.parse_args(argv)
    if args.verb is None:
        top.print_help()
        return 2
    cls = _settings_class(args.verb)
    try:
        overrides = overrides_from(args, cls)
        config = build(cls, overrides.get("config"), overrides)
        return importlib.import_module(VERBS[args.verb][2]).main(config) or 0
    except EdgetuneError as exc:
        if str(exc):  # empty: one process of a run stopping after another said why
            print(f"edgetune: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # a signal outside the training loop, which checkpoints itself
        from edgetune.signals import exit_status

        print("edgetune: interrupted", file=sys.stderr)
        return exit_status(exc)
