"""Distillation loss against a teacher's top-k log-probabilities, without batch x seq x vocab logits.

The teacher's top-k (edgetune.distill) is renormalised into a distribution p over its k tokens; the
student's log-probabilities log q are taken over its whole vocabulary. Per response token:

- forward KL: sum_k p (log p - log q), the gradient on the student's logits is q - p;
- JSD (beta 1/2, as in GKD): with m = (p + q) / 2, outside the top-k p is 0 and q / m is 2, so the
  sum over the rest of the vocabulary needs only 1 - sum_k q; the gradient on the logits is
  q * (g - sum q g) with g = log(q / m) / 2;

plus `ce_weight` times the cross-entropy on the response token itself. Every one of these gradients
is a multiple of softmax(logits) @ weight plus a few rows of the weight, so the chunked online
softmax of edgetune.train.loss serves them as it serves plain cross-entropy: the full row of logits
never exists.
"""

import math
from typing import Any

import torch

from edgetune.constants import WIDEN_ELEMENTS
from edgetune.train.loss import _online_softmax, block_rows, chunk_tokens, labelled_hidden

HALF_LOG2 = 0.5 * math.log(2)


def _kd_terms(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> tuple:
    """(loss per token, a, b): the loss's gradient on the logits is a * q + b at the top-k ids.

    `student` and `teacher` are log-probabilities at the teacher's top-k ids, [n, k]; the teacher's
    are renormalised over those k here.
    """
    log_p = teacher.float().log_softmax(dim=1)
    p = log_p.exp()
    if kind == "kl":
        loss = (p * (log_p - student)).sum(dim=1)
        return loss, torch.ones_like(loss), -p
    q = student.exp()
    log_m = torch.logaddexp(log_p, student) - math.log(2)
    rest = (1 - q.sum(dim=1)).clamp_min(0)  # the student's mass outside the top-k
    g = 0.5 * (student - log_m)
    loss = 0.5 * (p * (log_p - log_m)).sum(dim=1) + (q * g).sum(dim=1) + HALF_LOG2 * rest
    mean_g = HALF_LOG2 * rest + (q * g).sum(dim=1)
    return loss, HALF_LOG2 - mean_g, q * (g - HALF_LOG2)


def _weighted_rows(weight: torch.Tensor, ids: torch.Tensor, coef: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """sum_j coef[:, j] * weight[ids[:, j]], [n, hidden], a few tokens' rows at a time."""
    n, m = ids.shape
    out = torch.empty(n, weight.shape[1], dtype=dtype, device=weight.device)
    step = max(1, WIDEN_ELEMENTS // (m * weight.shape[1]))
    for start in range(0, n, step):
        rows = weight[ids[start:start + step]].to(dtype)  # [step, m, hidden]
        out[start:start + step] = torch.einsum("nm,nmh->nh", coef[start:start + step].to(dtype), rows)
    return out


class _LinearDistill(torch.autograd.Function):
    """sum of KD(hidden @ weight.T, teacher top-k) + ce_weight * CE, d/d hidden chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                top_ids: torch.Tensor, top_logprobs: torch.Tensor, rows: int, cap: float | None,
                kind: str, ce_weight: float) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk = chunk_tokens(rows)
        k = top_ids.shape[1]
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            cols = torch.cat([top_ids[start:start + len(h)], targets[start:start + len(h), None]], 1)
            lse, picked, softmax_w, slope = _online_softmax(h, weight, cols, rows, want_grad, cap)
            student = picked[:, :k] - lse[:, None]
            loss, a, b = _kd_terms(student, top_logprobs[start:start + len(h)], kind)
            total += (loss + ce_weight * (lse - picked[:, k])).sum()
            if want_grad:
                coef = torch.cat([b, torch.full_like(a[:, None], -ce_weight)], 1)
                if cap:
                    coef = coef * slope
                grad[start:start + len(h)] = (softmax_w.mul_((a + ce_weight)[:, None].to(h.dtype))
                                              + _weighted_rows(weight, cols, coef, h.dtype))
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype),) + (None,) * 8


def distill_loss(model: Any, batch: dict, kind: str = "kl",
                 ce_weight: float = 0.5) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of response tokens) of a batch that carries the teacher's top-k
    at its response tokens (`top_ids`, `top_logprobs`: [tokens, k], in the batch's order)."""
    head, selected, wanted, cap = labelled_hidden(model, batch)
    if batch["top_ids"].shape[0] != wanted.numel():
        raise ValueError(f"the teacher's top-k covers {batch['top_ids'].shape[0]} tokens, the batch "
                         f"has {wanted.numel()} response tokens")
    loss = _LinearDistill.apply(selected, head.weight, wanted, batch["top_ids"].long(),
                                batch["top_logprobs"], block_rows(head.weight, selected.dtype), cap,
                                kind, ce_weight)
    return loss, int(wanted.numel())
