"""Attention for packed rows: causal within each example, never across examples.

`data.pack` puts a micro-batch's examples end to end in one row with position ids restarting at 0
and the example boundaries under `data.SEGMENTS`. `segment_attention`, registered with transformers'
AttentionInterface (its documented extension point) when a run starts, makes one causal SDPA call per
example: no example sees another, and no work goes into the cross-example blocks that a
block-diagonal mask would still compute. A model left on plain "sdpa" trains correctly on packed rows
too (transformers derives a block-diagonal mask from the position ids), only slower.
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
    gqa = query.shape[1] != key.shape[1]
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, scale=scaling,
        is_causal=True, enable_gqa=gqa) for a, b in zip(bounds[:-1], bounds[1:])]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def use_segment_attention(model: Any) -> None:
    """Switch a causal LM (or a PEFT model around one) to `segment_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, segment_attention)
    # Padded batches and generation still need SDPA's padding mask; packed rows ignore the mask.
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    causal_lm.set_attn_implementation(ATTENTION)
