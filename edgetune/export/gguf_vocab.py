"""The tokenizer half of a GGUF file: tokens, merges, special ids, chat template and pre-tokenizer.

llama.cpp does not run the pre-tokenizer described in tokenizer.json; it picks a hand-written one by
the name in `tokenizer.ggml.pre`. A wrong name still loads and chats, but splits text differently from
training (digits, contractions, newlines), so an unknown pre-tokenizer is refused rather than guessed.
"""

import json
from pathlib import Path

from edgetune import models
from edgetune.errors import EdgetuneError

_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Pre-tokenizer steps of tokenizer.json reduced to a signature (see _signature) -> llama.cpp's name.
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel+regex",): "gpt-2",  # plain GPT-2 byte-level BPE (the tiny test tokenizer)
    ("digits:individual", "bytelevel+regex"): "smollm",  # SmolLM / SmolLM2
    ("split:" + _LETTERS + r"\p{N}{1,3}" + _REST, "bytelevel"): "llama-bpe",  # Llama 3.x
    ("split:" + _LETTERS + r"\p{N}" + _REST, "bytelevel"): "qwen2",  # Qwen2, Qwen2.5, Qwen3
}
# Tokens that end an assistant turn in common chat templates, most specific first.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def _signature(step: dict) -> str:
    kind = step.get("type")
    if kind == "ByteLevel":
        if step.get("add_prefix_space"):
            return "bytelevel+prefix-space"
        return "bytelevel+regex" if step.get("use_regex", True) else "bytelevel"
    if kind == "Digits":
        return "digits:individual" if step.get("individual_digits") else "digits"
    if kind == "Split" and not step.get("invert") and step.get("behavior") == "Isolated":
        return "split:" + str(step.get("pattern", {}).get("Regex"))
    return json.dumps(step, sort_keys=True)


def pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp's name for the model's pre-tokenizer, from its GGUF source or tokenizer.json."""
    source = models.source_info(model_dir).get("tokenizer.ggml.pre")
    if source:  # converted from a GGUF: its tokenizer.json no longer describes the original
        return source
    tokenizer = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    config = tokenizer.get("pre_tokenizer") or {}
    steps = config.get("pretokenizers", [config]) if config.get("type") == "Sequence" else [config]
    signature = tuple(_signature(s) for s in steps)
    if signature not in PRE_TOKENIZERS:
        known = ", ".join(sorted(PRE_TOKENIZERS.values()))
        raise EdgetuneError(f"{model_dir}: unknown pre-tokenizer {json.dumps(config)[:200]}; "
                            f"supported families: {known}")
    return PRE_TOKENIZERS[signature]


def _tokens(tokenizer: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and types by id, padded to the model's vocabulary size."""
    from gguf import TokenType

    model = tokenizer["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise EdgetuneError(f"tokenizer model {model.get('type')} (byte_fallback="
                            f"{model.get('byte_fallback')}) is not supported; only byte-level BPE "
                            "tokenizers (GPT-2, Llama 3, Qwen, SmolLM style) are")
    by_id = {i: (t, TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if by_id and max(by_id) >= n_vocab:
        raise EdgetuneError(f"tokenizer has token id {max(by_id)} but the model's vocabulary "
                            f"is only {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):  # ids without a token (embedding padding) must still be listed
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    return tokens, types


def end_of_turn(tokens: list[str], chat_template: str | None, eos_id: int | None) -> int | None:
    """The token that ends an assistant turn: the template's end marker, else eos."""
    for text in END_OF_TURN:
        if chat_template and text in chat_template and text in tokens:
            return tokens.index(text)
    return eos_id


def add_vocab(writer, model_dir: Path, n_vocab: int) -> None:
    """Write the tokenizer of `model_dir` into `writer` (a gguf.GGUFWriter)."""
    from gguf import SpecialVocab

    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise EdgetuneError(f"{model_dir} has no tokenizer.json; only fast (tokenizer.json) "
                            "tokenizers can be exported to GGUF")
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokens, types = _tokens(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(model_dir))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise EdgetuneError(f"{model_dir}/tokenizer.json has no BPE merges")
    # llama.cpp's defaults for these differ by pre-tokenizer; writing them pins what HF does.
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)
    template = special.chat_template if isinstance(special.chat_template, str) else None
    eot = end_of_turn(tokens, template, special.special_token_ids.get("eos"))
    if eot is not None:
        writer.add_eot_token_id(eot)


def chat_stops(tokenizer) -> list[str]:
    """Texts that end a reply: the end-of-turn token of the chat template, then eos."""
    template = tokenizer.chat_template or ""
    vocab = tokenizer.get_vocab()
    stops = [t for t in END_OF_TURN if t in template and t in vocab][:1]
    return list(dict.fromkeys(stops + ([tokenizer.eos_token] if tokenizer.eos_token else [])))
