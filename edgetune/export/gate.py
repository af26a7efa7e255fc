"""How far an exported file's next-token distributions are from torch's, and when that is too far.

Top-1 agreement is a poor gate for small models: at near-tied positions the argmax flips on rounding
noise alone (SmolLM2-135M's q8_0 agrees at 95% on fiction). Like llama.cpp's `llama-perplexity
--kl-divergence`, verification measures KL(torch || file) at every position instead, and gates on

- relative KLD: mean KLD divided by the reference's mean KL(torch || uniform), i.e. the share of the
  way from the torch model to a model that knows nothing. Rounding noise of a given precision costs a
  roughly fixed share whatever the model's size or confidence (its logit errors scale with the logits),
  while a broken file loses a large share. A confident model and a near-uniform tiny test model are
  held to the same bar.
- clear-margin top-1: agreement at positions where torch's top token leads the runner-up by at least
  CLEAR_MARGIN nats; rounding cannot flip those, a wrong file does.

The thresholds come from the measurements in docs/export.md: every good file measured stays at least
about 8x below its bar and every injected fault lands at least about 10x above it.
"""

from dataclasses import dataclass

CLEAR_MARGIN = 1.0  # nats: torch's top token at least e times likelier than its runner-up


@dataclass(frozen=True)
class Gate:
    """The most a file of one precision may differ from torch and still pass."""

    max_relative_kld: float
    min_clear_top1: float

    def failures(self, kind: str, relative_kld: float, kld: float, clear_top1: float | None,
                 clear_positions: int) -> list[str]:
        """What fails, each naming the measure, its value and the bar; [] when the file passes."""
        import math

        failed = []
        if not math.isfinite(kld):
            return ["KLD is not finite: the file computes NaN or infinite logits"]
        if relative_kld > self.max_relative_kld:
            failed.append(f"relative KLD {relative_kld:.2%} (mean {kld:.4f} nats) is above the "
                          f"{self.max_relative_kld:.2%} allowed for {kind}")
        if clear_top1 is not None and clear_top1 < self.min_clear_top1:
            failed.append(f"top-1 at the {clear_positions} clear-margin positions is "
                          f"{clear_top1:.1%}, below the {self.min_clear_top1:.0%} required")
        return failed


# 16-bit and fp32 files differ from torch by float rounding only; 8-bit ones also round weights
# (and llama.cpp and onnxruntime's int8 kernels round activations to 8 bits).
_SIXTEEN = Gate(max_relative_kld=0.002, min_clear_top1=0.98)
_EIGHT = Gate(max_relative_kld=0.005, min_clear_top1=0.98)
GATES = {"f16": _SIXTEEN, "bf16": _SIXTEEN, "fp32": _SIXTEEN, "q8_0": _EIGHT, "int8": _EIGHT}
# Sub-8-bit files are reported, not gated; past these they change the model enough to say so.
HURTS_RELATIVE_KLD = 0.02
HURTS_PPL_RATIO = 1.10


@dataclass(frozen=True)
class Distance:
    """Position by position: KL(torch || file), whether the argmax agrees, torch's top-2 margin."""

    kld: "object"  # numpy [positions], nats
    top1: "object"  # numpy [positions], bool
    margin: "object"  # numpy [positions], nats
    max_logit_diff: float

    @property
    def clear(self):
        return self.margin >= CLEAR_MARGIN

    @property
    def clear_top1(self) -> float | None:
        clear = self.clear
        return float(self.top1[clear].mean()) if clear.any() else None


def distance(logits, ref_logits, chunk: int = 64) -> Distance:
    """Compare [positions, vocab] logits with torch's, a chunk of positions at a time (float64
    log-probabilities of a 150k vocabulary take 300 MB per 256 positions)."""
    import numpy as np

    from edgetune.metrics import log_softmax

    kld, top1, margin = [], [], []
    for start in range(0, len(ref_logits), chunk):
        ref = log_softmax(ref_logits[start:start + chunk])
        got = log_softmax(logits[start:start + chunk])
        kld.append((np.exp(ref) * (ref - got)).sum(-1))
        top1.append(got.argmax(-1) == ref.argmax(-1))
        two = np.partition(ref, -2, axis=-1)[:, -2:]
        margin.append(two[:, 1] - two[:, 0])
    diff = float(np.abs(np.asarray(logits, np.float32) - np.asarray(ref_logits, np.float32)).max())
    return Distance(np.maximum(np.concatenate(kld), 0.0), np.concatenate(top1),
                    np.concatenate(margin), diff)


def information(ref_logits, chunk: int = 64) -> float:
    """Mean KL(torch || uniform) = log(vocab) - entropy: the KLD of a file that knows nothing."""
    import numpy as np

    from edgetune.metrics import log_softmax

    total = 0.0
    for start in range(0, len(ref_logits), chunk):
        ref = log_softmax(ref_logits[start:start + chunk])
        total += float((np.log(ref.shape[-1]) + (np.exp(ref) * ref).sum(-1)).sum())
    return total / len(ref_logits)
