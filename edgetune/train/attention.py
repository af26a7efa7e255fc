"""Attention for packed rows: causal within each example, never across examples.

`data.pack` puts a micro-batch's examples end to end in one row with position ids restarting at 0
and the example boundaries under `data.SEGMENTS`. `segment_attention`, registered with transformers'
AttentionInterface (its documented extension point) when a run starts, makes causal SDPA calls within
each example: no example sees another, and no work goes into the cross-example blocks that a
block-diagonal mask would still compute. Neighbouring examples of the same length (all of them, on
text that fills --seq-len) go into one call as a batch, which SDPA runs faster than one call each. A
model left on plain "sdpa" trains correctly on packed rows too (transformers derives a block-diagonal
mask from the position ids), only slower.

Sliding-window layers (Gemma 2/3's local layers) get `sliding_window` from transformers: a query at
position i sees keys i - window < j <= i of its own example (transformers' `sliding_window_overlay`).
An example no longer than the window is plain causal; a longer one gets that banded mask.
"""

from typing import Any

import torch

from edgetune.train.data import SEGMENTS

ATTENTION = "edgetune_segments"


def segment_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed example; plain SDPA for padded batches and generation."""
    bounds = kwargs.get(SEGMENTS)
    if bounds is None or query.shape[2] != bounds[-1]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:  # SDPA has no logit soft-capping (Gemma 2)
        raise NotImplementedError("packed rows with attention logit soft-capping")
    window = kwargs.get("sliding_window")
    gqa = query.shape[1] != key.shape[1]
    parts = []
    for start, length, count in _equal_runs(bounds):
        q, k, v = (t[:, :, start:start + length * count].unflatten(2, (count, length))
                   .transpose(1, 2).flatten(0, 1) for t in (query, key, value))
        mask = _window_mask(length, window, query.device)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None,
            enable_gqa=gqa)
        parts.append(out.transpose(1, 2).reshape(1, length * count, *out.shape[1::2]))
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).contiguous(), None


def _equal_runs(bounds: tuple) -> list[tuple[int, int, int]]:
    """(start, length, count) of each run of neighbouring examples with the same length."""
    runs: list[list[int]] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if runs and runs[-1][1] == b - a:
            runs[-1][2] += 1
        else:
            runs.append([a, b - a, 1])
    return [tuple(r) for r in runs]


def _window_mask(n: int, window: int | None, device: Any) -> torch.Tensor | None:
    """The boolean (n, n) mask of causal attention within `window` keys, or None when plain causal
    attention is the same thing (no window, or an example no longer than it)."""
    if window is None or n <= window:
        return None
    i = torch.arange(n, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance < window)


def use_segment_attention(model: Any) -> None:
    """Switch a causal LM (or a PEFT model around one) to `segment_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, segment_attention)
    # Padded batches and generation still need SDPA's padding mask; packed rows ignore the mask.
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    causal_lm.set_attn_implementation(ATTENTION)
