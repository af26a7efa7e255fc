"""Soft prompts on a device: prompt tuning's and P-tuning's virtual token embeddings beside a GGUF.

A soft prompt cannot fold into the weights: it is a few learned input vectors that go in before the
text. PEFT saves them as `prompt_embeddings` (for P-tuning, its encoder's output, which is all that
inference needs). Export writes them to `soft-prompt.safetensors` (one float32 tensor `embeddings`,
[virtual tokens, hidden size]) beside a GGUF of the unchanged base model, and llama.cpp takes them as
input embeddings through its batch API before the prompt's tokens (edgetune.export.llama), which is
what PEFT's forward does in torch. Prefix tuning's per-layer keys and values have no such input.
"""

import json
from pathlib import Path

from edgetune.errors import EdgetuneError
from edgetune.runfiles import ADAPTER_CONFIG, ADAPTER_WEIGHTS

TENSOR = "embeddings"


def from_adapter(adapter_dir: Path):
    """The virtual token embeddings [n, hidden] (numpy float32) of a prompt or P-tuning adapter."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        tensors = load_file(str(weights))
    except (OSError, SafetensorError) as exc:
        raise EdgetuneError(f"{weights} cannot be read ({exc}): the file is truncated or damaged") from None
    embeddings = tensors.get("prompt_embeddings")
    expected = (config.get("num_virtual_tokens"), config.get("token_dim"))
    if embeddings is None or tuple(embeddings.shape) != expected:
        raise EdgetuneError(f"{weights}: expected prompt_embeddings of shape {expected[0]}x{expected[1]}")
    return embeddings.astype("float32")


def write(path: Path, embeddings, method: str, base: str) -> None:
    """Write the soft prompt file (its method and base model as metadata)."""
    from safetensors.numpy import save_file

    save_file({TENSOR: embeddings}, str(path), metadata={"method": method, "base_model": base})


def load(path: str | Path):
    """The embeddings [n, hidden] of a soft prompt file, or a one-line error saying what is wrong."""
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not Path(path).is_file():
        raise EdgetuneError(f"soft prompt {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise EdgetuneError(f"soft prompt {path} is not a readable safetensors file ({exc})") from None
    embeddings = tensors.get(TENSOR)
    if embeddings is None or embeddings.ndim != 2 or not np.isfinite(embeddings).all():
        raise EdgetuneError(f"soft prompt {path} has no finite 2-D '{TENSOR}' tensor: write it with "
                            "edgetune export from a prompt or P-tuning run")
    return np.ascontiguousarray(embeddings, dtype=np.float32)


def logits_with(model, ids, embeddings):
    """`model`'s (an HF causal LM) logits over `ids` [batch, T] with the virtual tokens before them,
    at the text's positions only: what PEFT's forward computes."""
    import torch

    tokens = model.get_input_embeddings()(ids)
    prompt = torch.as_tensor(embeddings, dtype=tokens.dtype)[None].expand(ids.shape[0], -1, -1)
    return model(inputs_embeds=torch.cat([prompt, tokens], dim=1)).logits[:, len(embeddings):]
