"""`edgetune run`: answer one prompt with a GGUF model in llama.cpp, using the file's own chat template.

The template is rendered here with jinja2 and sent as a raw completion: llama-cpp-python's chat
handler guesses a format from the metadata and, for SmolLM2's GGUF, produced garbage where the same
ChatML prompt sent raw answered correctly.
"""

from collections.abc import Sequence
from pathlib import Path

from edgetune import templates
from edgetune.errors import EdgetuneError
from edgetune.export.config import RunConfig


def render_template(template: str, messages: list[dict], bos: str = "", eos: str = "") -> str:
    """An HF chat template rendered the way transformers does, with the generation prompt."""
    return templates.render(template, messages, True, bos, eos)


def _token_text(llm, key: str) -> str:
    value = llm.metadata.get(key)
    if value is None:
        return ""
    return llm.detokenize([int(value)], special=True).decode("utf-8", errors="replace")


def _prompt_and_stops(llm, prompt: str, system: str | None) -> tuple[str, list[str]]:
    template = llm.metadata.get("tokenizer.chat_template")
    bos = _token_text(llm, "tokenizer.ggml.bos_token_id")
    eos = _token_text(llm, "tokenizer.ggml.eos_token_id")
    eot = _token_text(llm, "tokenizer.ggml.eot_token_id")
    if not template:  # a base model without a chat template: continue the text as given
        return prompt, [t for t in (eot, eos) if t]
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": prompt})
    text = render_template(template, messages, bos, eos)
    if bos and text.startswith(bos) and llm.metadata.get("tokenizer.ggml.add_bos_token") == "true":
        text = text[len(bos):]  # llama.cpp adds it again when tokenizing
    return text, list(dict.fromkeys(t for t in (eot, eos) if t))


def answer(gguf_path: str | Path, prompt: str, max_tokens: int = 256, lora: str | Path | None = None,
           temperature: float = 0.0, system: str | None = None, ctx: int = 2048,
           adapters: Sequence[tuple[str | Path, float]] = ()) -> str:
    """The model's reply to one user message, generated through llama.cpp, with one adapter GGUF
    (`lora`, scale 1) or several stacked with their scales (`adapters`)."""
    from edgetune.export.llama import load_llama

    adapters = [(Path(p), scale) for p, scale in adapters] + ([(Path(lora), 1.0)] if lora else [])
    for path in (gguf_path, *(p for p, _ in adapters)):
        if not Path(path).is_file():
            raise EdgetuneError(f"{path} does not exist")
    llm = load_llama(Path(gguf_path), n_ctx=ctx, adapters=adapters, logits_all=False)
    try:
        return reply(llm, prompt, max_tokens, temperature, system)
    finally:
        llm.close()


def reply(llm, prompt: str, max_tokens: int = 256, temperature: float = 0.0,
          system: str | None = None) -> str:
    """The reply of an already loaded llama-cpp-python model to one user message."""
    text, stops = _prompt_and_stops(llm, prompt, system)
    try:
        result = llm.create_completion(text, max_tokens=max_tokens, temperature=temperature,
                                       stop=stops or None, seed=0)
    except ValueError as exc:  # e.g. the prompt is longer than the context
        raise EdgetuneError(f"{exc}; try a larger --ctx") from None
    return result["choices"][0]["text"].strip()


def main(config: RunConfig) -> int:
    print(answer(config.model, config.prompt, config.max_tokens, None, config.temperature,
                 config.system, config.ctx, adapters=config.adapters))
    return 0
