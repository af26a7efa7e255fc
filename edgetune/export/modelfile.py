"""Ollama Modelfiles beside exported GGUF files.

Ollama does not run jinja chat templates; it wants a Go template. A template that renders like one
of edgetune's named templates (edgetune.templates: chatml, gemma, llama3, plain) gets that one's Go
equivalent; a ChatML template with a built-in system message (SmolLM2, Qwen) gets ChatML's, with
that message as SYSTEM. Other templates get no TEMPLATE line and a comment saying so, rather than a
guess that formats chats wrongly.
"""

from collections.abc import Sequence
from pathlib import Path

from edgetune import templates
from edgetune.errors import EdgetuneError
from edgetune.export.run import render_template

_CHATML_PROBE = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
                 "<|im_start|>assistant\n")


def chatml_default_system(template: str) -> tuple[bool, str | None]:
    """(is ChatML, the system message the template adds when none is given)."""
    try:
        probe = render_template(template, [{"role": "system", "content": "S"},
                                           {"role": "user", "content": "U"}])
        alone = render_template(template, [{"role": "user", "content": "U"}])
    except EdgetuneError:  # a template that refuses these messages is not plain ChatML
        return False, None
    if probe != _CHATML_PROBE:
        return False, None
    head = alone.split("<|im_start|>user\n")[0]
    if head.startswith("<|im_start|>system\n") and head.endswith("<|im_end|>\n"):
        return True, head[len("<|im_start|>system\n"):-len("<|im_end|>\n")]
    return True, None


def _quoted(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def adapter_lines(adapters: Sequence[tuple[str, float]]) -> list[str]:
    """The ADAPTER line for (adapter GGUF name, scale) pairs, refusing what Ollama cannot apply.

    Ollama takes one adapter at scale 1: its Modelfile parser keeps only the last ADAPTER line, its
    `create` refuses several adapter files ("only one adapter is currently supported"), and ADAPTER
    has no scale. Stacked adapters are merged into one first (`edgetune merge`).
    """
    if len(adapters) > 1:
        names = " + ".join(name for name, _ in adapters)
        raise EdgetuneError(f"Ollama applies one ADAPTER per model, not {names}: merge the runs into "
                            "one with edgetune merge, then export it with --gguf-adapter")
    if adapters and adapters[0][1] != 1.0:
        name, scale = adapters[0]
        raise EdgetuneError(f"Ollama's ADAPTER has no scale ({name} at {scale:g}): bake the scale in "
                            f"with edgetune merge RUN --weights {scale:g}, then export that run")
    return [f"ADAPTER ./{name}" for name, _ in adapters]


def modelfile_text(gguf_name: str, template: str | None, stops: list[str],
                   adapters: Sequence[tuple[str, float]] = ()) -> str:
    """The Modelfile for `gguf_name` (relative to the Modelfile) with its chat format and stops, and
    the adapter GGUF (name, scale) to apply over it, if any."""
    lines = [f"FROM ./{gguf_name}", *adapter_lines(adapters)]
    known = templates.known(template)
    is_chatml, system = chatml_default_system(template) if template else (False, None)
    if known is None and is_chatml:
        known = templates.TEMPLATES["chatml"]
    if known is not None:
        lines.append(f"TEMPLATE {_quoted(known.go)}")
        if system:
            lines.append(f"SYSTEM {_quoted(system)}")
    elif template:
        lines.append("# The chat template is not ChatML; write a TEMPLATE line in Ollama's Go syntax.")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path, template: str | None, stops: list[str],
                    adapter: Path | None = None) -> Path:
    """Write `<gguf stem>.Modelfile` (or the adapter's) beside the file; `ollama create -f` reads it."""
    named = adapter or gguf_path
    out = named.with_name(named.stem + ".Modelfile")
    out.write_text(modelfile_text(gguf_path.name, template, stops,
                                  [(adapter.name, 1.0)] if adapter else []))
    return out
