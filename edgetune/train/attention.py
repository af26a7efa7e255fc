"""Attention for packed rows: causal within each example, never across examples.

`data.pack` puts a micro-batch's examples end to end in one row with position ids restarting at 0
and the example boundaries under `data.SEGMENTS`. `segment_attention`, registered with transformers'
AttentionInterface (its documented extension point) when a run starts, makes one causal SDPA call per
example: no example sees another, and no work goes into the cross-example blocks that a
block-diagonal mask would still compute. A model left on plain "sdpa" trains correctly on packed rows
too (transformers derives a block-diagonal mask from the position ids), only slower.

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
    for a, b in zip(bounds[:-1], bounds[1:]):
        mask = _window_mask(b - a, window, query.device)
        parts.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], attn_mask=mask, dropout_p=dropout,
            scale=scaling, is_causal=mask is None, enable_gqa=gqa))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


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
