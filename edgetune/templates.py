"""Chat templates: the ones edgetune knows by name, `--template FILE.jinja`, and the default for a
base model that has none. Torch-free: the planner-free `train` settings and `export` both use it.

A template is a Hugging Face (jinja) chat template. Training renders each conversation with it and
learns the assistant's tokens; export writes the same text into the GGUF (`tokenizer.chat_template`),
the ONNX tokenizer files and, as the equivalent Go template, the Ollama Modelfile, so a model chats
the way it was trained. `GO` holds those Go templates (Ollama adds the BOS token itself).
"""

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from edgetune.errors import EdgetuneError

# A template with no system turn of its own puts a system message before the first user turn.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\\n\\n' }}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")
# Instruction/response prompts (Alpaca's layout) for base models with no chat tokens at all; the
# response ends with eos so that the model learns to stop.
PLAIN = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% elif message['role'] == 'user' %}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}{% else %}"
    "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}")

GO_CHATML = '''{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{- end }}<|im_start|>assistant
'''
GO_GEMMA = '''{{- $first := true }}
{{- range .Messages }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }}<end_of_turn>
{{ $first = false }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
'''
GO_LLAMA3 = '''{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}{{- end }}<|start_header_id|>assistant<|end_header_id|>

'''
GO_PLAIN = '''{{- if .System }}{{ .System }}

{{ end }}
{{- range .Messages }}
{{- if eq .Role "user" }}### Instruction:
{{ .Content }}

{{ else if eq .Role "assistant" }}### Response:
{{ .Content }}

{{ end }}
{{- end }}### Response:
'''


@dataclass(frozen=True)
class Template:
    """A named chat template: the jinja text, Ollama's Go equivalent, and the tokens that mark it."""

    name: str
    jinja: str
    go: str
    markers: tuple[str, ...]  # special tokens the format is built on ((): plain text)
    end_of_turn: str | None  # the text that ends an assistant turn (None: eos)


TEMPLATES = {t.name: t for t in (
    Template("chatml", CHATML, GO_CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
    Template("gemma", GEMMA, GO_GEMMA, ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>"),
    Template("llama3", LLAMA3, GO_LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
             "<|eot_id|>"),
    Template("plain", PLAIN, GO_PLAIN, (), None),
)}
# A base model's default: the first format whose special tokens are all in its vocabulary.
DEFAULT_ORDER = ("gemma", "llama3", "chatml", "plain")
_PROBE_USER, _PROBE_ASSISTANT = "Name a colour.", "Blue."


def render(template: str, messages: list[dict], add_generation_prompt: bool = True, bos: str = "",
           eos: str = "") -> str:
    """A chat template rendered the way transformers does (sandboxed, trimmed blocks)."""
    import json

    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise EdgetuneError(f"chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template).render(messages=messages,
                                                add_generation_prompt=add_generation_prompt,
                                                bos_token=bos, eos_token=eos)
    except TemplateError as exc:
        raise EdgetuneError(f"cannot render the chat template: {exc}") from None


def check(text: str, source: str) -> None:
    """Refuse a template that does not render a user turn and then an assistant turn after it.

    Training needs the prompt (user turn plus generation prompt) to be a prefix of the whole
    conversation, so that the assistant's tokens can be found and learned.
    """
    user = [{"role": "user", "content": _PROBE_USER}]
    whole = user + [{"role": "assistant", "content": _PROBE_ASSISTANT}]
    try:
        prompt = render(text, user, True, "<bos>", "<eos>")
        full = render(text, whole, False, "<bos>", "<eos>")
    except EdgetuneError as exc:
        raise EdgetuneError(f"--template {source}: {exc}") from None
    if _PROBE_USER not in prompt:
        raise EdgetuneError(f"--template {source} does not render the user's message "
                            f"(a user turn {_PROBE_USER!r} rendered as {prompt[:120]!r})")
    if not full.startswith(prompt) or _PROBE_ASSISTANT not in full[len(prompt):]:
        raise EdgetuneError(f"--template {source} does not render an assistant turn after the "
                            f"prompt (user + generation prompt rendered as {prompt[:120]!r}, the "
                            f"conversation as {full[:160]!r})")


def resolve(spec: str) -> tuple[str, str]:
    """(name, jinja text) of `--template NAME|FILE.jinja`; unknown names and bad files raise."""
    if spec in TEMPLATES:
        return spec, TEMPLATES[spec].jinja
    path = Path(spec).expanduser()
    if path.suffix not in (".jinja", ".j2") and not path.is_file():
        raise EdgetuneError(f"--template {spec}: unknown template; known: {', '.join(TEMPLATES)}, "
                            "or a .jinja file")
    if not path.is_file():
        raise EdgetuneError(f"--template {spec}: file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgetuneError(f"--template {spec}: cannot read it ({exc})") from None
    check(text, spec)
    return str(path), text


def default_for(vocab: set[str] | dict) -> str:
    """The template a base model gets when it has none: the first of DEFAULT_ORDER whose special
    tokens its vocabulary has (Gemma's turn markers for Gemma, ChatML's for SmolLM, ...)."""
    for name in DEFAULT_ORDER:
        if all(marker in vocab for marker in TEMPLATES[name].markers):
            return name
    return "plain"


def missing_markers(text: str, vocab: set[str] | dict) -> list[str]:
    """Special tokens of a known format used by `text` that the vocabulary does not have."""
    used = {m for t in TEMPLATES.values() for m in t.markers if m in text}
    return sorted(m for m in used if m not in vocab)


def known(template: str | None, bos: str = "", eos: str = "") -> Template | None:
    """The named template that renders exactly like `template` (same probe conversations), if any."""
    if not template:
        return None
    probes = ([{"role": "user", "content": "U"}],
              [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
               {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}])
    try:
        wanted = [render(template, p, True, bos, eos) for p in probes]
    except EdgetuneError:
        return None
    for entry in TEMPLATES.values():
        if [render(entry.jinja, p, True, bos, eos) for p in probes] == wanted:
            return entry
    return None



def choose(spec: str | None, own: str | None, vocab: set[str] | dict, needs_one: bool,
           model: str) -> tuple[str | None, str | None]:
    """(name, text) of the template a run trains with, or (None, None) for the model's own (or none,
    for text records). Says which one it is, and warns about format tokens the vocabulary lacks."""
    if spec:
        name, text = resolve(spec)
        print(f"edgetune: chat template: {name}")
    elif own or not needs_one:
        return None, None
    else:
        name = default_for(vocab)
        text = TEMPLATES[name].jinja
        print(f"edgetune: {model} has no chat template (a base model): using '{name}', chosen "
              f"from its vocabulary; pass --template ({', '.join(TEMPLATES)} or a .jinja file) "
              "to choose another")
    missing = missing_markers(text, vocab)
    if missing:
        print(f"edgetune: warning: the template's {', '.join(missing)} are not tokens of this "
              "model: they will be spelled out in several tokens")
    return name, text
