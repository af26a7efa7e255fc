"""Training configurations drawn at random for benchmarks/planner_accuracy.py --random.

Shapes are the catalogue's llama, qwen2, qwen3, mistral and gemma3 models from 135M to 1.6B parameters;
larger ones keep their exact layer shapes and vocabulary with fewer decoder layers (named
`name-Nl`), so 7B-class layers and untied 150k vocabularies are drawn too. Each draw picks a shape,
then the base format, optimizer, LoRA rank, micro-batch, sequence length and checkpointing; one
in three is instead a `--plan auto --ram B` question, whose settings the planner chooses. Draws
whose estimated run time or memory is beyond what this machine runs in a few minutes are drawn
again, so the draw is uniform over what is left.
"""

import random
from dataclasses import asdict, dataclass

from edgetune.plan.catalogue import CATALOGUE
from edgetune.plan.memory import OPTIMS, QUANTS, TOKENIZER_BYTES_PER_ENTRY, Setting, breakdown
from edgetune.plan.search import ranked
from edgetune.plan.timing import flops_per_token
from edgetune.shape import ModelShape, shape_from_config

# (catalogue name, decoder layers kept or None for all), by family.
SHAPES = {
    "llama": [("smollm2-135m", None), ("smollm2-360m", None), ("llama-3.2-1b", None)],
    "qwen2": [("qwen2.5-0.5b", None), ("qwen2.5-1.5b", None), ("qwen2.5-7b", 1)],
    "qwen3": [("qwen3-0.6b", None), ("qwen3-1.7b", 20)],
    "mistral": [("mistral-7b", 2), ("mistral-7b", 4)],
    "gemma3": [("gemma3-270m", None), ("gemma3-1b", None)],
}
RANKS = (4, 8, 16, 32, 64)
BATCHES = (1, 2, 4, 8)
SEQ_LENS = (64, 128, 256, 512)
STEPS = 2  # the peak is reached in the second step (the optimizer state exists from the first)
# What a run may cost here (a 2-core machine shared with other work): start-up, loading at about
# 10M parameters a second, and the steps' matmul work at 4 GFLOP/s, as measured on it under load.
# A run may take MAX_SECONDS, or a little more than the cheapest settings of a large shape.
MAX_SECONDS = 100
STARTUP_SECONDS = 30
LOAD_PARAMS_PER_SECOND = 1e7
ASSUMED_GFLOPS = 4.0
MAX_PEAK = 5 * 2**30


@dataclass(frozen=True)
class Draw:
    """One configuration: a shape, the settings it trains with, and the --ram budget it runs under."""

    model: str
    layers: int | None
    quant: str
    optim: str
    rank: int
    batch: int
    grad_accum: int
    seq_len: int
    ckpt: bool
    budget: int  # --ram for the run, in bytes
    auto: bool  # trained with --plan auto: the trainer chooses the settings for `budget`
    target_batch: int = 1  # --plan auto's effective batch (--batch-size, with --grad-accum 1)

    @property
    def shape_name(self) -> str:
        return self.model if self.layers is None else f"{self.model}-{self.layers}l"

    @property
    def key(self) -> str:
        how = f" auto@{self.budget / 2**30:.2f}g/{self.target_batch}" if self.auto else ""
        accum = f"x{self.grad_accum}" if self.grad_accum > 1 else ""
        return (f"{self.shape_name} {self.quant} {self.optim} r{self.rank} {self.batch}x{self.seq_len}"
                f"{accum}{' ckpt' if self.ckpt else ''}{how}")

    def setting(self) -> Setting:
        return Setting(quant=self.quant, rank=self.rank, batch_size=self.batch, seq_len=self.seq_len,
                       grad_checkpointing=self.ckpt, optim=self.optim, dtype="fp32",
                       grad_accum=self.grad_accum)

    def as_dict(self) -> dict:
        return asdict(self)


def shape_of(model: str, layers: int | None) -> ModelShape:
    config = dict(CATALOGUE[model][1])
    if layers is not None:
        config["num_hidden_layers"] = layers
    return shape_from_config(config, model if layers is None else f"{model}-{layers}l")


# The shaped models carry SmolLM2's tokenizer (_common.shaped_model), whatever their vocabulary.
SHAPED_TOKENIZER_ENTRIES = 49_152


def predicted_peak(shape: ModelShape, setting: Setting) -> int:
    """The planner's peak for a shaped model: its tokenizer term is for the tokenizer the run loads
    (SmolLM2's), not the catalogue model's own; every other term is the shape's."""
    extra = TOKENIZER_BYTES_PER_ENTRY * (shape.vocab - SHAPED_TOKENIZER_ENTRIES)
    return breakdown(shape, setting).peak - extra


def seconds(shape: ModelShape, setting: Setting, grad_accum: int = 1) -> float:
    """Estimated wall time of the run on a busy machine."""
    tokens = STEPS * grad_accum * setting.tokens
    return (STARTUP_SECONDS + shape.params / LOAD_PARAMS_PER_SECOND
            + tokens * flops_per_token(shape, setting) / (ASSUMED_GFLOPS * 1e9))


def _cheapest(shape: ModelShape) -> float:
    return seconds(shape, Setting(quant="none", rank=4, batch_size=1, seq_len=min(SEQ_LENS),
                                  dtype="fp32"))


def _fits_here(shape: ModelShape, setting: Setting, grad_accum: int = 1) -> bool:
    allowed = max(MAX_SECONDS, 1.1 * _cheapest(shape))
    return (seconds(shape, setting, grad_accum) <= allowed
            and breakdown(shape, setting).peak <= MAX_PEAK)


def _explicit(rng: random.Random, model: str, layers: int | None) -> Draw | None:
    shape = shape_of(model, layers)
    draw = Draw(model, layers, rng.choice(QUANTS), rng.choice(OPTIMS), rng.choice(RANKS),
                rng.choice(BATCHES), 1, rng.choice(SEQ_LENS), rng.random() < 0.5, 0, False)
    if not _fits_here(shape, draw.setting()):
        return None
    # The run's --ram is the least budget the planner accepts these settings for: the guard must
    # let it finish unless the measured peak passes that.
    budget = -(-breakdown(shape, draw.setting()).total // 2**20) * 2**20
    return Draw(**{**draw.as_dict(), "budget": budget})


def _planned(rng: random.Random, model: str, layers: int | None) -> Draw | None:
    """A `--plan auto` question: a budget between the least this shape needs and what its most
    preferred settings need, at a drawn sequence length and effective batch."""
    shape = shape_of(model, layers)
    seq_len, target = rng.choice(SEQ_LENS), rng.choice((1, 2, 4))
    plans = ranked(shape, 2**60, seq_len=seq_len, target_batch=target, dtype="fp32")
    least = min(p.memory.total for p in plans)
    budget = int(rng.uniform(least, plans[0].memory.total) // 2**20 * 2**20)
    fitting = ranked(shape, budget, seq_len=seq_len, target_batch=target, dtype="fp32")
    if not fitting:
        return None
    plan = fitting[0]
    if not _fits_here(shape, plan.setting, plan.grad_accum):
        return None
    return Draw(model, layers, plan.quant, plan.optim, plan.rank, plan.batch_size, plan.grad_accum,
                seq_len, plan.grad_checkpointing, budget, True, target)


def draw(n: int, seed: int) -> list[Draw]:
    """`n` configurations for `seed`; the same seed gives the same list."""
    rng = random.Random(seed)
    out: list[Draw] = []
    while len(out) < n:
        family = rng.choice(sorted(SHAPES))
        model, layers = rng.choice(SHAPES[family])
        make = _planned if len(out) % 3 == 2 else _explicit
        for _ in range(100):  # settings this machine runs in a few minutes, for the drawn shape
            found = make(rng, model, layers)
            if found is not None and _settings(found) not in {_settings(d) for d in out}:
                out.append(found)
                break
    return out


def _settings(d: Draw) -> tuple:
    """What a run trains with, whatever budget it was asked under."""
    return (d.shape_name, d.quant, d.optim, d.rank, d.batch, d.grad_accum, d.seq_len, d.ckpt)
