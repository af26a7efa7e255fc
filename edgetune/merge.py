"""`edgetune merge`: several LoRA runs into one adapter (or one merged model), one layer at a time.

For each adapted layer the inputs' updates dW_i = scale_i * B_i @ A_i are combined by the chosen method
(edgetune.export.algebra) and factored back into a LoRA of rank R by truncated SVD; the share of each
layer's energy that rank R keeps is reported. The output is an ordinary run folder (PEFT adapter plus
edgetune_run.yaml naming the base and the merge), so `export`, `run`, `--gguf-adapter` and a further
`merge` take it like any run. It stores r = lora_alpha = R (scale 1): the factors carry the whole
update, whatever alphas and rsLoRA settings the inputs had.
"""

import contextlib
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from edgetune import folders
from edgetune.config import option
from edgetune.errors import EdgetuneError
from edgetune.export.algebra import DENSITY_METHODS, METHODS
from edgetune.export.command import run_lock
from edgetune.runfiles import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHAT_TEMPLATE, MERGE_RECORD, RUN_CONFIG,
                               TOKENIZER)
from edgetune.signals import stop_on_signals
from edgetune.units import format_size

DEFAULT_DENSITY = 0.5
DATA_SETTINGS = ("data", "eval_data", "eval_split", "seed", "seq_len")  # carried into the merged run
LORA_METHODS = ("lora", "rslora")  # run `method:` values whose adapter is a plain LoRA (B @ A)
_PEFT_KEY = "base_model.model.{module}.lora_{side}.weight"
# What marks an output as edgetune's, so that --force may replace it: a run, or a --full merge.
MERGE_MARKERS = {RUN_CONFIG: "run settings", MERGE_RECORD: "merge record"}


@dataclass(frozen=True)
class MergeConfig:
    runs: tuple[str, ...] = option((), "run folders from `edgetune train` (or PEFT adapter folders) "
                                   "to merge", positional=True, metavar="RUN")
    output: str | None = option(None, "folder for the merged run (or model, with --full)")
    weights: str | None = option(None, "one weight per run, comma-separated, e.g. 0.6,0.4 "
                                 "(default: 1 each)", metavar="W1,W2")
    method: str = option("linear", "how the updates combine: linear (weighted sum), svd (the same, "
                         "default rank the largest input's), ties, dare_ties, dare_linear, "
                         "cat (the inputs side by side, exact)", choices=METHODS)
    rank: int | None = option(None, "rank of the merged adapter (default: the sum of the input "
                              "ranks, which is exact for linear; svd: the largest input rank)")
    density: float | None = option(None, "ties/dare: share of each update's entries kept "
                                   f"(default: {DEFAULT_DENSITY})")
    seed: int = option(0, "seed of DARE's random drops and of the randomized SVD")
    full: bool = option(False, "write the merged full model (HF folder, fp32) instead of an adapter")
    force: bool = option(False, "replace an existing output folder that edgetune made")
    cache_dir: str | None = option(None, "where GGUF models are cached as HF checkpoints "
                                   "(default: $EDGETUNE_CACHE or ~/.cache/edgetune)")
    threads: int | None = option(None, "CPU threads for torch (default: all cores; on a busy "
                                 "machine 1 is faster, see docs/merge.md)")

    def __post_init__(self) -> None:
        if not self.runs:
            raise EdgetuneError("nothing to merge: pass run folders, e.g. edgetune merge runs/a runs/b "
                                "--output runs/ab")
        if not self.output:
            raise EdgetuneError("no --output: name the folder for the merged run, e.g. --output runs/ab")
        self.weight_list  # noqa: B018 - validates --weights now, before anything loads
        if self.rank is not None and self.rank < 1:
            raise EdgetuneError(f"--rank must be at least 1, got {self.rank}")
        if self.threads is not None and self.threads < 1:
            raise EdgetuneError(f"--threads must be at least 1, got {self.threads}")
        if self.full and self.rank is not None:
            raise EdgetuneError("--rank has no effect with --full: the merged update goes into the "
                                "base whole; leave out one of them")
        if self.density is not None:
            if self.method not in DENSITY_METHODS:
                raise EdgetuneError(f"--density applies to {', '.join(DENSITY_METHODS)}, "
                                    f"not --method {self.method}")
            if not 0 < self.density <= 1:
                raise EdgetuneError(f"--density must be in (0, 1], got {self.density}")

    @property
    def weight_list(self) -> list[float]:
        """One weight per run: checked to be numbers, as many as the runs, >= 0 and not all 0."""
        if self.weights is None:
            return [1.0] * len(self.runs)
        items = [w.strip() for w in self.weights.split(",")]
        try:
            values = [float(w) for w in items]
        except ValueError:
            bad = next(w for w in items if not _is_number(w))
            raise EdgetuneError(f"--weights {self.weights}: {bad!r} is not a number") from None
        if len(values) != len(self.runs):
            raise EdgetuneError(f"--weights {self.weights}: {len(values)} weights for {len(self.runs)} "
                                "runs; give one weight per run")
        if any(not math.isfinite(v) or v < 0 for v in values):
            bad = next(w for w, v in zip(items, values) if not math.isfinite(v) or v < 0)
            raise EdgetuneError(f"--weights {self.weights}: {bad} is not allowed; "
                                "weights must be finite and 0 or more")
        if not any(values):
            raise EdgetuneError(f"--weights {self.weights}: all weights are 0, which merges nothing")
        return values

    @property
    def density_value(self) -> float | None:
        if self.method not in DENSITY_METHODS:
            return None
        return DEFAULT_DENSITY if self.density is None else self.density


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Input:
    """One run to merge: its folder, its adapter (read a layer at a time) and its resolved base."""

    run: Path
    adapter: "object"  # edgetune.export.merge.Adapter
    source: "object"  # edgetune.export.command.Source


def read_inputs(config: MergeConfig) -> list[Input]:
    """The runs, checked to be LoRA adapters of one base over the same modules and shapes."""
    inputs = [_read_input(Path(run).expanduser(), config.cache_dir) for run in config.runs]
    first = inputs[0]
    for other in inputs[1:]:
        if first.source.model_dir.resolve() != other.source.model_dir.resolve():
            raise EdgetuneError(f"{other.run} was trained on {other.source.model_ref} and {first.run} on "
                                f"{first.source.model_ref}: adapters of different base models cannot "
                                "be merged")
        names, theirs = set(first.adapter.names), set(other.adapter.names)
        if names != theirs:
            extra = sorted(names ^ theirs)[0]
            owner = first.run if extra in names else other.run
            raise EdgetuneError(f"{first.run} and {other.run} adapt different modules (only {owner} "
                                f"adapts {extra.removesuffix('.weight')}): retrain one with the other's "
                                "--target-modules")
    _check_shapes(inputs)
    return inputs


def _read_input(run: Path, cache_dir: str | None) -> Input:
    from edgetune.export.command import run_settings, run_source
    from edgetune.export.merge import Adapter

    if not run.is_dir():
        raise EdgetuneError(f"run folder {run} does not exist")
    if (run / RUN_CONFIG).is_file():
        method = run_settings(run).get("method") or "lora"  # runs from before methods were named
        if method not in LORA_METHODS:
            raise EdgetuneError(f"{run} was trained with --method {method}: only LoRA adapters "
                                f"({', '.join(LORA_METHODS)}) can be merged")
    source = run_source(run, cache_dir)
    if source is None:
        raise EdgetuneError(f"{run} is not a LoRA run: it has no {ADAPTER_CONFIG} or {RUN_CONFIG}; "
                            "pass a folder written by edgetune train")
    return Input(run, Adapter(run), source)


def _check_shapes(inputs: list[Input]) -> None:
    """Every adapted module has one (out, in) across the inputs, equal to the base weight's."""
    from edgetune.hf import open_weights, weight_files

    base: dict[str, tuple[int, int]] = {}
    for file in weight_files(inputs[0].source.model_dir):
        with open_weights(file) as f:
            base.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    for item in inputs:
        for name in item.adapter.names:
            shape = item.adapter.shape(name)
            if base.get(name) != shape:
                found = "x".join(map(str, base[name])) if name in base else "no such weight"
                raise EdgetuneError(f"{item.run}: {name} is {shape[0]}x{shape[1]} in the adapter but "
                                    f"the base {item.source.model_ref} has {found}: was it trained on "
                                    "another model?")


def output_ranks(config: MergeConfig, inputs: list[Input]) -> dict[str, int]:
    """The merged adapter's rank per base weight name."""
    names = inputs[0].adapter.names
    sums = {name: sum(item.adapter.rank(name) for item in inputs) for name in names}
    if config.method == "cat":
        if config.rank is not None and set(sums.values()) != {config.rank}:
            raise EdgetuneError(f"--method cat keeps every input's rank, so the merged rank is "
                                f"{max(sums.values())}, not --rank {config.rank}: leave out --rank, "
                                "or use --method svd to choose one")
        return sums
    limits = {name: min(inputs[0].adapter.shape(name)) for name in names}
    tightest = min(names, key=limits.get)
    if config.rank is not None:
        if config.rank > limits[tightest]:
            out, inp = inputs[0].adapter.shape(tightest)
            raise EdgetuneError(f"--rank {config.rank} is more than {tightest.removesuffix('.weight')} "
                                f"({out}x{inp}) can hold: use at most {limits[tightest]}")
        rank = config.rank
    elif config.method == "svd":
        rank = max(item.adapter.rank(name) for item in inputs for name in names)
    else:
        rank = max(sums.values())
    return {name: min(rank, limits[tightest]) for name in names}


def _layer_seed(seed: int, index: int) -> int:
    """A seed per layer, so each layer's random draws do not depend on the layers before it."""
    return seed * 1_000_003 + index


def merged_update(inputs: list[Input], config: MergeConfig, name: str, index: int):
    """The combined dense update of base weight `name` (--full, cat and svd combine linearly)."""
    pairs = _pairs(inputs, name)
    method = "linear" if config.method == "cat" else config.method
    return combine_updates([p.update() for p in pairs], config, method, index)


def combine_updates(updates: list, config: MergeConfig, method: str, index: int):
    from edgetune.export.algebra import combine

    return combine(updates, config.weight_list, method, config.density_value,
                   _layer_seed(config.seed, index))


def _pairs(inputs: list[Input], name: str) -> list:
    import torch

    pairs = [item.adapter.pair(name) for item in inputs]
    for item, pair in zip(inputs, pairs):
        if not (torch.isfinite(pair.a).all() and torch.isfinite(pair.b).all()):
            raise EdgetuneError(f"{item.run}: {pair.module} has NaN or infinite values "
                                "(diverged training?): not merging it")
    return pairs


def merged_factors(inputs: list[Input], config: MergeConfig, ranks: dict[str, int],
                   energies: dict[str, float]):
    """(PEFT key, tensor) of the merged adapter, A then B, one layer at a time; fills `energies`."""
    from edgetune.export.algebra import concatenate, factor

    alpha = common_rank(ranks)
    for index, name in enumerate(inputs[0].adapter.names):
        if config.method == "cat":
            a, b = concatenate(_pairs(inputs, name), config.weight_list)
            kept = 1.0
        else:
            update = merged_update(inputs, config, name, index)
            a, b, kept = factor(update, ranks[name], _layer_seed(config.seed, index))
            del update
        if ranks[name] != alpha:  # this module's scale is alpha / its rank: B carries the inverse
            b = b * (ranks[name] / alpha)
        energies[name] = kept
        module = name.removesuffix(".weight")
        yield _PEFT_KEY.format(module=module, side="A"), a
        yield _PEFT_KEY.format(module=module, side="B"), b


def write_adapter(inputs: list[Input], config: MergeConfig, ranks: dict[str, int],
                  folder: Path) -> dict[str, float]:
    """adapter_model.safetensors (streamed) and adapter_config.json; returns the energy kept."""
    import json

    from edgetune.export.merge import write_safetensors

    shapes = {}
    for name, rank in ranks.items():
        out, inp = inputs[0].adapter.shape(name)
        module = name.removesuffix(".weight")
        shapes[_PEFT_KEY.format(module=module, side="A")] = [rank, inp]
        shapes[_PEFT_KEY.format(module=module, side="B")] = [out, rank]
    energies: dict[str, float] = {}
    write_safetensors(folder / ADAPTER_WEIGHTS, shapes, merged_factors(inputs, config, ranks, energies))
    settings = adapter_settings(inputs[0].adapter.config, ranks)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return energies


def common_rank(ranks: dict[str, int]) -> int:
    """The most common of the merged ranks: the adapter's r and its lora_alpha."""
    values = list(ranks.values())
    return max(set(values), key=values.count)


def adapter_settings(template: dict, ranks: dict[str, int]) -> dict:
    """The first input's adapter_config.json with the merged rank: r = lora_alpha (scale 1), and a
    rank_pattern for modules whose rank differs (cat of uneven ranks). There is no alpha_pattern:
    one alpha for every module is what a GGUF adapter can hold (edgetune.export.gguf.adapter_alpha),
    so those modules' B factors absorb their scale alpha / rank instead."""
    rank = common_rank(ranks)
    pattern = {name.removesuffix(".weight"): r for name, r in ranks.items() if r != rank}
    return {**template, "r": rank, "lora_alpha": rank, "rank_pattern": pattern,
            "alpha_pattern": {}, "use_rslora": False, "use_dora": False}


def write_full(inputs: list[Input], config: MergeConfig, folder: Path) -> None:
    """Base + merged update as a plain HF model folder, one base tensor at a time."""
    from edgetune.export.merge import write_merged

    updates = {name: (lambda name=name, index=index: merged_update(inputs, config, name, index))
               for index, name in enumerate(inputs[0].adapter.names)}
    write_merged(inputs[0].source.model_dir, folder, updates)


def record(config: MergeConfig, inputs: list[Input], ranks: dict[str, int],
           energies: dict[str, float]) -> dict:
    """edgetune_run.yaml of the merged run: the base (so export needs nothing else) and the merge."""
    first = inputs[0].source
    rank = common_rank(ranks) if ranks else None
    merge = {"inputs": [str(i.run.resolve()) for i in inputs], "weights": config.weight_list,
             "method": config.method, "rank": rank, "density": config.density_value,
             "seed": config.seed, "full": config.full}
    if energies:
        merge["energy_kept"] = {"min": round(min(energies.values()), 6),
                                "median": round(statistics.median(energies.values()), 6)}
    # The first run's data: what export verifies on and calibrates an importance matrix with.
    trained = {k: v for k, v in (first.run_config or {}).items() if k in DATA_SETTINGS}
    saved = {"model": first.model_ref, "cache_dir": config.cache_dir, **trained}
    if not config.full:
        saved.update(method="lora", rank=rank, alpha=rank)
    return {**saved, "merge": merge}


def chat_template(inputs: list[Input]) -> str | None:
    """The chat template the first run trained with (None: the model's own); a run that trained
    with another one is named, since the merged adapter answers in one format only."""
    first = inputs[0].source.chat_template
    for item in inputs[1:]:
        if item.source.chat_template != first:
            folders.say(f"{item.run} trained with another chat template than {inputs[0].run}; "
                        f"the merged run uses {inputs[0].run}'s")
    return first


def check_output(out: Path, config: MergeConfig, inputs: list[Input]) -> None:
    """Refuse an output that holds an input run (replacing it would delete what is being merged),
    that edgetune did not make, or that exists without --force."""
    for item in inputs:
        if out.resolve() in (item.run.resolve(), *item.run.resolve().parents):
            raise EdgetuneError(f"--output {out} holds the input run {item.run}: choose another folder")
    if folders.inspect_output(out, MERGE_MARKERS) == "ours" and not config.force:
        raise EdgetuneError(f"output folder {out} exists: pass --force to replace it or --output "
                            "elsewhere")


def energy_summary(energies: dict[str, float], ranks: dict[str, int]) -> str:
    """One line: the least and the median share of energy kept, and the three worst layers."""
    worst = sorted(energies.items(), key=lambda item: item[1])[:3]
    named = ", ".join(f"{name.removesuffix('.weight')} {kept:.2%}" for name, kept in worst)
    return (f"energy kept at rank {common_rank(ranks)}: min {worst[0][1]:.2%}, "
            f"median {statistics.median(energies.values()):.2%} over {len(energies)} layers; "
            f"lowest: {named}")


def main(config: MergeConfig) -> int:
    from edgetune.train.heap import peak_rss

    out = Path(config.output).expanduser()
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    with stop_on_signals():
        inputs = read_inputs(config)
        check_output(out, config, inputs)
        ranks = {} if config.full else output_ranks(config, inputs)
        _say_plan(config, inputs, ranks)
        with folders.disk_errors(out.parent):
            out.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with contextlib.ExitStack() as locks:
            for item in inputs:  # no training may rewrite an input meanwhile
                locks.enter_context(run_lock(item.source, verb="edgetune merge"))
            locks.enter_context(folders.sibling_lock(out, f"merge output {out}", verb="edgetune merge"))
            check_output(out, config, inputs)
            folders.remove_leftovers(out.parent, prefix=f".{out.name}.")
            energies = _write(config, inputs, ranks, out)
    if energies:
        print(f"edgetune: {energy_summary(energies, ranks)}")
    print(f"edgetune: merged {len(inputs[0].adapter.names)} layers in "
          f"{time.perf_counter() - started:.1f} s, peak memory {format_size(peak_rss())}; wrote {out}")
    return 0


def _say_plan(config: MergeConfig, inputs: list[Input], ranks: dict[str, int]) -> None:
    """What will be merged, and the planner's peak memory for it."""
    from edgetune.plan.merge import merge_peak
    from edgetune.shape import shape_from_model_dir

    shape = shape_from_model_dir(inputs[0].source.model_dir)
    input_ranks = [max(i.adapter.rank(n) for n in i.adapter.names) for i in inputs]
    predicted = merge_peak(shape, input_ranks, config.method, config.full)
    target = "a full model" if config.full else f"rank {common_rank(ranks)}"
    weights = ", ".join(f"{w:g}" for w in config.weight_list)
    folders.say(f"merging {len(inputs)} runs ({config.method}, weights {weights}) into {target}; "
                f"predicted peak memory {format_size(predicted)}")


def _write(config: MergeConfig, inputs: list[Input], ranks: dict[str, int], out: Path) -> dict:
    """Write the merge into a temporary folder beside `out`, then publish it; the energy kept."""
    from edgetune.export.command import publish

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    energies: dict[str, float] = {}
    try:
        with folders.disk_errors(out.parent, cleanup=[tmp]):
            tmp.mkdir()
            if config.full:
                write_full(inputs, config, tmp)
            else:
                energies = write_adapter(inputs, config, ranks, tmp)
                if (inputs[0].run / TOKENIZER).is_dir():
                    shutil.copytree(inputs[0].run / TOKENIZER, tmp / TOKENIZER)
            template = chat_template(inputs)
            if template is not None:  # a run's file and a model folder's own template: one name
                (tmp / CHAT_TEMPLATE).write_text(template, encoding="utf-8")
            saved = record(config, inputs, ranks, energies)
            (tmp / (MERGE_RECORD if config.full else RUN_CONFIG)).write_text(
                yaml.safe_dump(saved, sort_keys=False))
            folders.fsync_tree(tmp)
            publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return energies
