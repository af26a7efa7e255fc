"""A Hugging Face model folder on disk: its config.json and its safetensors files. No torch."""

import json
from pathlib import Path

from edgetune.errors import EdgetuneError


def read_config(model_dir: str | Path) -> dict:
    """config.json of an HF folder as a dict; a missing or unreadable file is a user error."""
    file = Path(model_dir) / "config.json"
    if not file.is_file():
        raise EdgetuneError(f"model folder {model_dir} has no config.json: pass a Hugging Face model "
                            "folder (config.json, safetensors weights, tokenizer)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgetuneError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise EdgetuneError(f"{file}: expected a JSON object")
    return config


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF folder (one, or the shards its index names)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EdgetuneError(f"{index}: not a safetensors index ({exc})") from None
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise EdgetuneError(f"{model_dir}: no model.safetensors "
                            "(only safetensors checkpoints are supported)")
    return [single]
