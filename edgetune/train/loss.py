"""Next-token loss without batch x seq x vocab logits.

Only positions whose next token carries a label go through the output layer, and they go in chunks:
the forward pass of each chunk also computes the gradient with respect to its hidden states, so the
backward pass needs neither the logits nor a second matmul. The output layer is frozen (LoRA adapts
the decoder), so no weight gradient is needed.
"""

from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100
# fp32 logits elements per chunk: 2**25 is 128 MiB, small beside the model, large enough to be fast.
CHUNK_ELEMENTS = 2**25


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary: ~680 for 49k tokens, ~220 for 151k."""
    return max(16, CHUNK_ELEMENTS // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum of cross-entropy(hidden @ weight.T, targets), with d/d hidden computed chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if want_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax in place of the logits
                probs[torch.arange(len(t), device=t.device), t] -= 1
                grad[start:start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def causal_lm_loss(model: Any, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of label tokens) for a batch, through a PEFT-wrapped causal LM."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = causal_lm.model, causal_lm.get_output_embeddings()
    hidden = decoder(**_inputs(batch), use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    selected = hidden[:, :-1][keep]
    wanted = targets[keep]
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("output layers with a bias are not supported")
    loss = _LinearCrossEntropy.apply(selected, head.weight, wanted,
                                     chunk_tokens(head.weight.shape[0]))
    return loss, int(wanted.numel())


def _inputs(batch: dict) -> dict:
    """Decoder inputs of a padded batch (attention mask) or a packed one (positions, boundaries)."""
    if "attention_mask" in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    from edgetune.train.data import SEGMENTS

    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            SEGMENTS: batch[SEGMENTS]}


def reference_loss(model: Any, batch: dict) -> tuple[torch.Tensor, int]:
    """The same sum computed the plain way, full logits and F.cross_entropy (for tests)."""
    logits = model(**_inputs(batch)).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())
