"""Check each GGUF file in llama.cpp against the torch merged model on the same held-out token ids.

Both sides see exactly the same ids (no re-tokenization), so any difference is the file's: weight
rounding, a wrong rotary permutation, a wrong hyper-parameter. f16/bf16 must agree with torch on the
top-1 token at >= 99% of positions and q8_0 at >= 97%; lower-bit types are reported, not failed.
"""

from dataclasses import dataclass
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.export.llama import gguf_logits
from edgetune.export.report import Verification
from edgetune.metrics import perplexity

TOP1_THRESHOLDS = {"f16": 0.99, "bf16": 0.99, "q8_0": 0.97}
# Below these a sub-8-bit file has changed the model enough to say so in words.
_HURTS_PPL_RATIO = 1.10
_HURTS_TOP1 = 0.90


@dataclass(frozen=True)
class Reference:
    """The torch merged model's next-token logits on the held-out ids (computed once per export)."""

    ids: list[int]  # positions + 1 token ids: logits at i predict ids[i + 1]
    logits: "object"  # numpy [positions, vocab], float32
    perplexity: float

    @property
    def positions(self) -> int:
        return len(self.ids) - 1


def torch_reference(model_dir: Path, ids: list[int]) -> Reference:
    """Run the HF model in fp32 over `ids` once; the baseline every exported file is held to."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float().numpy()
    del model
    return Reference(list(ids), logits, perplexity(logits, ids[1:]))


def compare(file: str, fmt: str, out_type: str, logits, reference: Reference, size_bytes: int,
            speed: float | None, note: str = "") -> Verification:
    """The report row for one file's logits against the torch reference."""
    import numpy as np

    if logits.shape != reference.logits.shape:
        raise EdgetuneError(f"{file}: llama.cpp returned logits of shape {logits.shape}, "
                            f"torch {reference.logits.shape}: vocabulary mismatch")
    agreement = float((logits.argmax(-1) == reference.logits.argmax(-1)).mean())
    ppl = perplexity(logits, reference.ids[1:])
    threshold = TOP1_THRESHOLDS.get(out_type)
    notes = [note] if note else []
    ratio = ppl / reference.perplexity
    if threshold is None and (ratio > _HURTS_PPL_RATIO or agreement < _HURTS_TOP1):
        notes.append(f"{out_type} changes this model a lot: it picks the torch model's next token "
                     f"at only {agreement:.1%} of positions, perplexity x{ratio:.2f}; small models "
                     "lose more to low-bit quantization: prefer q8_0 where it fits")
    passed = threshold is None or agreement >= threshold
    if not passed:
        notes.append(f"top-1 below the {threshold:.0%} required of {out_type}")
    return Verification(file=file, format=fmt, size_bytes=size_bytes, positions=reference.positions,
                        top1_agreement=agreement,
                        max_logit_diff=float(np.abs(logits - reference.logits).max()),
                        perplexity=ppl, torch_perplexity=reference.perplexity,
                        decode_tokens_per_s=speed,
                        passed=passed, note="; ".join(notes))


def verify_gguf(out_dir: Path, file: str, out_type: str, reference: Reference, note: str = "",
                lora: str | None = None) -> Verification:
    """Load `out_dir/file` (with `out_dir/lora` over it) in llama.cpp and compare with torch."""
    path = Path(out_dir) / file
    logits, speed = gguf_logits(path, reference.ids, Path(out_dir) / lora if lora else None)
    shown = lora or file
    fmt = f"gguf adapter over {out_type}" if lora else f"gguf {out_type}"
    size = (Path(out_dir) / shown).stat().st_size
    return compare(shown, fmt, out_type, logits, reference, size, speed, note)


def require_passed(rows: list[Verification]) -> None:
    """Raise with the numbers when any file is below its threshold."""
    failed = [r for r in rows if not r.passed]
    if failed:
        parts = [f"{r.file} ({r.format}) top-1 {r.top1_agreement:.1%}, max |dlogit| "
                 f"{r.max_logit_diff:.3f}, ppl ratio {r.perplexity_ratio:.3f}"
                 + (f" ({r.note})" if r.note else "") for r in failed]
        raise EdgetuneError("verification failed: " + "; ".join(parts) + "; nothing was written")

