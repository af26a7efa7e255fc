"""Check each GGUF file in llama.cpp against the torch merged model on the same held-out token ids.

Both sides see exactly the same ids (no re-tokenization), so any difference is the file's: weight
rounding, a wrong rotary permutation, a wrong hyper-parameter. f16, bf16 and q8_0 files are gated on
KL divergence and clear-margin top-1 agreement (see gate.py); lower-bit types are reported, not failed.
fp32 phone files (ExecuTorch, LiteRT) are held to the 16-bit gate.
"""

from dataclasses import dataclass
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.export.llama import gguf_logits
from edgetune.export.report import Verification
from edgetune.metrics import perplexity


class VerificationFailed(EdgetuneError):
    """A file was written but does not compute what the torch model computes."""


@dataclass(frozen=True)
class Reference:
    """The torch merged model's next-token logits on the held-out ids (computed once per export)."""

    ids: list[int]  # positions + 1 token ids: logits at i predict ids[i + 1]
    logits: "object"  # numpy [positions, vocab], float32
    perplexity: float
    information: float  # mean KL(torch || uniform), nats: see gate.information

    @property
    def positions(self) -> int:
        return len(self.ids) - 1


def torch_reference(model_dir: Path, ids: list[int], soft_prompt=None) -> Reference:
    """Run the HF model in fp32 over `ids` once (after the `soft_prompt` embeddings, when given); the
    baseline every exported file is held to."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        if soft_prompt is None:
            logits = model(torch.tensor([ids])).logits[0, :-1].float().numpy()
        else:
            from edgetune.export.soft_prompt import logits_with

            logits = logits_with(model, torch.tensor([ids]), soft_prompt)[0, :-1].float().numpy()
    del model
    return reference(ids, logits)


def reference(ids: list[int], logits) -> Reference:
    """The Reference for torch's `logits` [len(ids) - 1, vocab] over `ids`."""
    from edgetune.export.gate import information

    return Reference(list(ids), logits, perplexity(logits, ids[1:]), information(logits))


def compare(file: str, fmt: str, kind: str, logits, ref: Reference, size_bytes: int,
            speed: float | None, note: str = "") -> Verification:
    """The report row for one file's logits against the torch reference; `kind` picks the gate
    (gate.GATES: f16, bf16, q8_0, fp32, int8); other kinds are reported, not failed."""
    import numpy as np

    from edgetune.export.gate import GATES, HURTS_PPL_RATIO, HURTS_RELATIVE_KLD, distance

    if logits.shape != ref.logits.shape:
        raise EdgetuneError(f"{file}: the runtime returned logits of shape {logits.shape}, "
                            f"torch {ref.logits.shape}: vocabulary mismatch")
    d = distance(logits, ref.logits)
    kld = float(d.kld.mean())
    relative = kld / ref.information if ref.information > 0 else float("inf")
    ppl = perplexity(logits, ref.ids[1:])
    notes = [note] if note else []
    gate = GATES.get(kind)
    failed = gate.failures(kind, relative, kld, d.clear_top1, int(d.clear.sum())) if gate else []
    ratio = ppl / ref.perplexity
    if gate is None and (relative > HURTS_RELATIVE_KLD or ratio > HURTS_PPL_RATIO):
        notes.append(f"{kind} changes this model a lot (relative KLD {relative:.1%}, perplexity "
                     f"x{ratio:.2f}); small models lose more to low-bit quantization: prefer q8_0 "
                     "where it fits")
    return Verification(file=file, format=fmt, size_bytes=size_bytes, positions=ref.positions,
                        kld_mean=kld, kld_p99=float(np.percentile(d.kld, 99)) if len(d.kld) else 0.0,
                        relative_kld=relative, top1_agreement=float(d.top1.mean()),
                        clear_top1=d.clear_top1, clear_positions=int(d.clear.sum()),
                        max_logit_diff=d.max_logit_diff, perplexity=ppl,
                        torch_perplexity=ref.perplexity, decode_tokens_per_s=speed,
                        passed=not failed, note="; ".join(notes), failures=failed)


def verify_gguf(out_dir: Path, file: str, out_type: str, reference: Reference, note: str = "",
                lora: str | None = None, soft_prompt: str | None = None) -> Verification:
    """Load `out_dir/file` (with `out_dir/lora` over it, or after the `out_dir/soft_prompt` vectors)
    in llama.cpp and compare with torch."""
    path = Path(out_dir) / file
    embeddings = None
    if soft_prompt is not None:
        from edgetune.export.soft_prompt import load

        embeddings = load(Path(out_dir) / soft_prompt)
    logits, speed = gguf_logits(path, reference.ids, Path(out_dir) / lora if lora else None, embeddings)
    shown = lora or file
    fmt = f"gguf adapter over {out_type}" if lora else f"gguf {out_type}"
    if soft_prompt is not None:
        fmt += " after the soft prompt"
    size = (Path(out_dir) / shown).stat().st_size
    return compare(shown, fmt, out_type, logits, reference, size, speed, note)


def require_passed(rows: list[Verification], kept: str | None = None) -> None:
    """Raise naming each failed file's measures and thresholds, and what the user can do."""
    failed = [r for r in rows if not r.passed]
    if not failed:
        return
    parts = [f"{r.file} ({r.format}): {'; '.join(r.failures)}" for r in failed]
    where = (f"the rejected files are kept in {kept} (report.json has every figure)" if kept else
             "nothing was written; --keep-failed keeps the rejected files for inspection")
    raise VerificationFailed("verification failed: " + "; ".join(parts) + ". The file does not compute "
                        f"what the torch model computes; {where}. Export without the check with "
                        "--no-verify only if you trust the file")
