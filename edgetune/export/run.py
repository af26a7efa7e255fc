"""`edgetune run`: answer one prompt with a GGUF model in llama.cpp, using the file's own chat template.

The template is rendered here with jinja2 and sent as a raw completion: llama-cpp-python's chat
handler guesses a format from the metadata and, for SmolLM2's GGUF, produced garbage where the same
ChatML prompt sent raw answered correctly.
"""

import json
from collections.abc import Sequence
from pathlib import Path

from edgetune import templates
from edgetune.errors import EdgetuneError
from edgetune.export.config import RunConfig
from edgetune.runfiles import ADAPTER_CONFIG


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
           soft_prompt: str | Path | None = None,
           adapters: Sequence[tuple[str | Path, float]] = ()) -> str:
    """The model's reply to one user message, generated through llama.cpp, with one adapter GGUF
    (`lora`, scale 1) or several stacked with their scales (`adapters`), after the virtual tokens of
    a `soft_prompt` file when given."""
    from edgetune.export.llama import load_llama

    adapters = [(Path(p), scale) for p, scale in adapters] + ([(Path(lora), 1.0)] if lora else [])
    for path in (gguf_path, *(p for p, _ in adapters)):
        if not Path(path).is_file():
            raise EdgetuneError(f"{path} does not exist")
    embeddings = None
    if soft_prompt is not None:
        from edgetune.export.soft_prompt import load

        embeddings = load(soft_prompt)
    llm = load_llama(Path(gguf_path), n_ctx=ctx, adapters=adapters, logits_all=False)
    try:
        if embeddings is not None:
            text, stops = _prompt_and_stops(llm, prompt, system)
            return _after_soft_prompt(llm, embeddings, text, stops, max_tokens, temperature, ctx)
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


def _after_soft_prompt(llm, embeddings, text: str, stops: list[str], max_tokens: int,
                       temperature: float, ctx: int) -> str:
    """Generate after the soft prompt's vectors and `text`'s tokens, sampling as create_completion
    does (greedy at temperature 0), which has no way to take input embeddings."""
    import llama_cpp

    from edgetune.export.llama import prepend_embeddings

    tokens = llm.tokenize(text.encode("utf-8"), special=True)
    if len(embeddings) + len(tokens) + max_tokens > ctx:
        raise EdgetuneError(f"the soft prompt ({len(embeddings)} vectors), the prompt ({len(tokens)} "
                            f"tokens) and --max-tokens {max_tokens} do not fit --ctx {ctx}; try a "
                            "larger --ctx")
    llm.set_seed(0)
    prepend_embeddings(llm, embeddings)
    out: list[int] = []
    for token in llm.generate(tokens, reset=False, temp=temperature, top_k=40, top_p=0.95,
                              min_p=0.05):
        piece = llm.detokenize([token], special=True).decode("utf-8", errors="replace")
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or piece in stops:
            break
        out.append(token)
        if len(out) == max_tokens:
            break
    return llm.detokenize(out).decode("utf-8", errors="replace").strip()


def torch_and_llama_answers(run: Path, gguf: Path, soft_prompt: Path, records: list[dict],
                            max_tokens: int = 16) -> list[tuple[str, str]]:
    """(torch's greedy answer with the run's adapter, llama.cpp's with `gguf` and `soft_prompt`) for
    each alpaca record's prompt, one prompt at a time (no padding on either side)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgetune.records import prompt_messages
    from edgetune.train.evaluate import generate_answers
    from edgetune.train.model import load_adapter

    base_dir = json.loads((Path(run) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), run)
    pairs = []
    for record in records:
        messages = prompt_messages(record, "alpaca")
        ours = generate_answers(model, tokenizer, [messages], max_tokens, batch_size=1)[0]
        theirs = answer(gguf, messages[-1]["content"], max_tokens, soft_prompt=soft_prompt)
        pairs.append((ours, theirs))
    return pairs


def main(config: RunConfig) -> int:
    print(answer(config.model, config.prompt, config.max_tokens, None, config.temperature,
                 config.system, config.ctx, config.soft_prompt, adapters=config.adapters))
    return 0
