"""The tokenizer half of a GGUF file: tokens, merges or scores, special ids, chat template, pre-tokenizer.

Two tokenizer families, as llama.cpp names them:
- "gpt2", byte-level BPE (Llama 3, Qwen, SmolLM): tokens and merges from tokenizer.json. llama.cpp
  does not run the pre-tokenizer described there; it picks a hand-written one by the name in
  `tokenizer.ggml.pre`. A wrong name still loads and chats, but splits text differently from
  training (digits, contractions, newlines), so an unknown pre-tokenizer is refused, not guessed.
- "llama", SentencePiece (Gemma): tokens with scores (llama.cpp merges the highest-scoring pair
  first) and token types. tokenizer.json has no scores, so they come from the SentencePiece model
  (tokenizer.model, read with protobuf as llama.cpp's converter reads it with sentencepiece) or,
  for a checkpoint converted from a GGUF, from that GGUF.
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


def add_vocab(writer, model_dir: Path, n_vocab: int, chat_template: str | None = None) -> None:
    """Write the tokenizer of `model_dir` into `writer` (a gguf.GGUFWriter); `chat_template`
    replaces the folder's own."""
    from gguf import SpecialVocab

    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise EdgetuneError(f"{model_dir} has no tokenizer.json; only fast (tokenizer.json) "
                            "tokenizers can be exported to GGUF")
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    sentencepiece = tokenizer["model"].get("type") == "Unigram" or tokenizer["model"].get("byte_fallback")
    if sentencepiece:
        tokens, scores, types, space_prefix = spm_vocab(model_dir, n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(space_prefix)
    else:
        tokens, types = _tokens(tokenizer, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(model_dir))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    special = SpecialVocab(model_dir, load_merges=not sentencepiece, n_vocab=n_vocab)
    if not sentencepiece and not special.merges:
        raise EdgetuneError(f"{model_dir}/tokenizer.json has no BPE merges")
    if chat_template is not None:
        special.chat_template = chat_template
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


def spm_vocab(model_dir: Path, n_vocab: int) -> tuple[list[str], list[float], list[int], bool]:
    """(tokens, scores, token types, add_space_prefix) of a SentencePiece vocabulary, padded to
    `n_vocab` as llama.cpp's converter pads it."""
    source = models.source_info(model_dir)
    model_file = Path(model_dir) / "tokenizer.model"
    if model_file.is_file():
        tokens, scores, types, space_prefix = _from_sentencepiece(model_file)
        _apply_added(Path(model_dir), tokens, scores, types)
    elif source.get("gguf") and Path(source["gguf"]).is_file():
        tokens, scores, types, space_prefix = _from_gguf(Path(source["gguf"]))
    else:
        raise EdgetuneError(f"{model_dir}: a SentencePiece tokenizer needs its tokenizer.model (or "
                            "the GGUF it was converted from) for the token scores llama.cpp uses")
    if len(tokens) > n_vocab:
        raise EdgetuneError(f"tokenizer has {len(tokens)} tokens but the model's vocabulary is "
                            f"only {n_vocab}")
    from gguf import TokenType

    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    return tokens, scores, types, space_prefix


def _from_sentencepiece(path: Path) -> tuple[list[str], list[float], list[int], bool]:
    """Pieces, scores and types of a tokenizer.model (SentencePiece's piece types are GGUF's)."""
    from transformers.utils import sentencepiece_model_pb2_new as spm

    proto = spm.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError
        raise EdgetuneError(f"{path} is not a SentencePiece model ({exc})") from None
    pieces = list(proto.pieces)
    return ([p.piece for p in pieces], [p.score for p in pieces], [int(p.type) for p in pieces],
            proto.normalizer_spec.add_dummy_prefix)


def _apply_added(model_dir: Path, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """Tokens added on top of the SentencePiece model (tokenizer_config.json), as llama.cpp's
    converter types them: special ones CONTROL, others USER_DEFINED, score -1000."""
    from gguf import TokenType

    config_file = model_dir / "tokenizer_config.json"
    added = json.loads(config_file.read_text()).get("added_tokens_decoder", {}) if config_file.is_file() else {}
    for key, token in added.items():
        i = int(key)
        while i >= len(tokens):
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(int(TokenType.UNUSED))
        special = token.get("special")
        tokens[i] = token["content"] if special else token["content"].replace("\u2581", " ")
        scores[i] = -1000.0
        types[i] = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)


def _from_gguf(path: Path) -> tuple[list[str], list[float], list[int], bool]:
    """The vocabulary of the GGUF a checkpoint was converted from, exactly as stored there."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    if reader.get_field("tokenizer.ggml.model").contents() != "llama":
        raise EdgetuneError(f"{path} does not hold a SentencePiece vocabulary")
    space = reader.get_field("tokenizer.ggml.add_space_prefix")
    return (reader.get_field("tokenizer.ggml.tokens").contents(),
            [float(x) for x in reader.get_field("tokenizer.ggml.scores").contents()],
            [int(x) for x in reader.get_field("tokenizer.ggml.token_type").contents()],
            bool(space.contents()) if space is not None else True)
