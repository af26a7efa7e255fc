"""Next-token loss without batch x seq x vocab logits.

Only positions whose next token carries a label go through the output layer, and they go in chunks:
the forward pass of each chunk also computes the gradient with respect to its hidden states, so the
backward pass needs neither the logits nor a second matmul. The output layer is frozen (LoRA adapts
the decoder), so no weight gradient is needed.

The vocabulary is taken a block of rows at a time, with the softmax accumulated online across
blocks (a running maximum and sum per token, as flash attention does over keys), so a token's full
row of logits never exists, and each block of logits reuses memory that is already resident instead
of touching fresh pages (docs/performance.md has the measurements). An output layer stored narrower
than the hidden states (bf16 beside fp32 compute, see edgetune.train.model.narrow_embeddings) is
widened one block at a time, so the wide weight never exists either.

A model with final-logit soft-capping (Gemma 2, and Gemma 3 where its config sets it) scores
cap * tanh(logit / cap); each block is capped as it is computed, and the gradient takes the tanh's
slope, 1 - (capped / cap)^2, per logit.
"""

from typing import Any

import torch

from edgetune.constants import IGNORE, LOSS_BLOCK_ROWS, LOSS_LOGITS_ELEMENTS, WIDEN_ELEMENTS
from edgetune.train.prompts import decoder_inputs, learns_inputs


def block_rows(weight: torch.Tensor, dtype: torch.dtype) -> int:
    """Vocabulary rows per block of `weight` used in `dtype`."""
    vocab, hidden = weight.shape
    rows = min(vocab, LOSS_BLOCK_ROWS)
    return rows if weight.dtype == dtype else max(1, min(rows, WIDEN_ELEMENTS // hidden))


def chunk_tokens(rows: int) -> int:
    """Tokens per chunk for blocks of `rows` vocabulary rows: 1024 for 4096."""
    return max(16, LOSS_LOGITS_ELEMENTS // rows)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum of cross-entropy(hidden @ weight.T, targets), with d/d hidden computed chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                rows: int, cap: float | None = None) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk = chunk_tokens(rows)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + len(h)]
            lse, target_logit, softmax_w, target_slope = _online_softmax(h, weight, t, rows,
                                                                         want_grad, cap)
            total += (lse - target_logit).sum()
            if want_grad:  # softmax minus the one-hot target, times the weight
                target_w = weight[t].to(h.dtype)
                if cap:
                    target_w.mul_(target_slope[:, None].to(h.dtype))
                grad[start:start + len(h)] = softmax_w - target_w
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def _online_softmax(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, rows: int,
                    want_grad: bool, cap: float | None = None) -> tuple:
    """(logsumexp, target logit, softmax @ weight, target slope) of logits h @ weight.T (soft-capped
    at `cap`), `rows` vocab rows at a time. With a cap, softmax @ weight is weighted by each logit's
    slope and the target's slope is returned (else None).

    `t` holds one target per token ([n]) or several ([n, m], distillation's top-k); the target logits
    and slopes come back in its shape.
    """
    n = len(h)
    running_max = torch.full((n,), -torch.inf, dtype=torch.float32, device=h.device)
    running_sum = torch.zeros(n, dtype=torch.float32, device=h.device)
    target_logit = torch.empty(t.shape, dtype=torch.float32, device=h.device)
    acc = torch.zeros_like(h) if want_grad else None
    target_slope = torch.empty(t.shape, dtype=torch.float32, device=h.device) if cap else None
    index = torch.arange(n, device=h.device).view(-1, *([1] * (t.dim() - 1))).expand_as(t)
    for first in range(0, weight.shape[0], rows):
        w = weight[first:first + rows].to(h.dtype)  # a view when already in the compute dtype
        logits = (h @ w.T).float()
        slope = None
        if cap:
            logits.div_(cap).tanh_()
            slope = 1 - logits.square() if want_grad else None
            logits.mul_(cap)
        inside = (t >= first) & (t < first + len(w))
        target_logit[inside] = logits[index[inside], t[inside] - first]
        if slope is not None:
            target_slope[inside] = slope[index[inside], t[inside] - first]
        new_max = torch.maximum(running_max, logits.amax(dim=1))
        rescale = (running_max - new_max).exp_()
        probs = logits.sub_(new_max[:, None]).exp_()  # unnormalised, in place of the logits
        running_sum = running_sum * rescale + probs.sum(dim=1)
        if want_grad:
            weighted = probs if slope is None else slope.mul_(probs)
            acc.mul_(rescale[:, None].to(acc.dtype)).addmm_(weighted.to(w.dtype), w)
        running_max = new_max
    lse = running_max + running_sum.log()
    softmax_w = acc.div_(running_sum[:, None].to(acc.dtype)) if want_grad else None
    return lse, target_logit, softmax_w, target_slope


def labelled_hidden(model: Any, batch: dict) -> tuple[Any, torch.Tensor, torch.Tensor, float | None]:
    """(output layer, final hidden states at the labelled positions, their next-token labels, logit
    soft-cap) of a batch through a PEFT-wrapped causal LM; the logits themselves are never made."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = causal_lm.model, causal_lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("output layers with a bias are not supported")
    inputs, labels = _inputs(batch), batch["labels"]
    if learns_inputs(model):  # prompt, P- and prefix tuning: their virtual tokens go in first
        inputs, labels = decoder_inputs(model, batch)
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    return head, hidden[:, :-1][keep], targets[keep], cap


def causal_lm_loss(model: Any, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of label tokens) for a batch, through a PEFT-wrapped causal LM."""
    head, selected, wanted, cap = labelled_hidden(model, batch)
    loss = _LinearCrossEntropy.apply(selected, head.weight, wanted,
                                     block_rows(head.weight, selected.dtype), cap)
    return loss, int(wanted.numel())


def _inputs(batch: dict) -> dict:
    """Decoder inputs of a padded batch (attention mask) or a packed one (positions, boundaries)."""
    if "attention_mask" in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    from edgetune.train.data import SEGMENTS

    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
            SEGMENTS: batch[SEGMENTS]}

