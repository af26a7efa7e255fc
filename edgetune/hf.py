"""A Hugging Face model folder on disk: its config.json and its safetensors files. No torch."""

import json
from pathlib import Path

from edgetune.errors import EdgetuneError


def no_config(model_dir: str | Path) -> str:
    """The one line for a model folder without config.json, naming what would work instead."""
    ggufs = sorted(Path(model_dir).glob("*.gguf"))
    if ggufs:
        return (f"model folder {model_dir} has no config.json but holds {ggufs[0].name}: "
                f"pass --model {Path(model_dir) / ggufs[0].name}")
    return (f"model folder {model_dir} has no config.json: pass a Hugging Face model folder "
            "(config.json, safetensors weights, tokenizer), a .gguf file or a built-in model name")


def read_config(model_dir: str | Path) -> dict:
    """config.json of an HF folder as a dict; a missing or unreadable file is a user error."""
    file = Path(model_dir) / "config.json"
    if not file.is_file():
        raise EdgetuneError(no_config(model_dir))
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgetuneError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise EdgetuneError(f"{file}: expected a JSON object")
    return config


def read_supported_config(model_dir: str | Path, supported: dict[str, str], exporter: str) -> dict:
    """config.json of a model folder whose architecture is one of `supported` ({model_type:
    architecture class}); otherwise one line naming it and the supported ones."""
    config = read_config(model_dir)
    model_type = config.get("model_type")
    architecture = (config.get("architectures") or [None])[0]
    if model_type not in supported or architecture != supported[model_type]:
        raise EdgetuneError(f"{exporter} does not support {architecture or model_type}; "
                            f"supported architectures: {', '.join(supported)}")
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


def open_weights(file: Path):
    """safetensors' reader over one weight file (a context manager); a damaged file is a user error."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (OSError, SafetensorError) as exc:
        raise EdgetuneError(f"{file} cannot be read ({exc}): is the file truncated or damaged?") from None


def check_weights(model_dir: str | Path) -> None:
    """Open the header of every safetensors file of an HF folder: a truncated file fails here, in
    a second, rather than deep inside a loader after minutes of work."""
    model_dir = Path(model_dir)
    if not (model_dir / "model.safetensors").is_file() and \
            not (model_dir / "model.safetensors.index.json").is_file():
        return  # other formats are left to transformers
    for file in weight_files(model_dir):
        if not file.is_file():
            raise EdgetuneError(f"{model_dir}: weight file {file.name} is missing")
        with open_weights(file):
            pass
