"""The adapter methods edgetune trains, and what each one is: one table for the planner, the trainer and
the exporters. Torch-free.

A method is named by `--method`; underneath it is a PEFT config (edgetune.train.adapters builds it).
Three kinds: low-rank updates of linear weights (LoRA, DoRA, rsLoRA, AdaLoRA), learned scalings of
activations (IA3), and learned inputs (prompt tuning and P-tuning prepend virtual token embeddings,
prefix tuning prepends keys and values to every attention layer). The first two fold into the base
weights; learned inputs cannot, and travel beside the model where a runtime can take them.
"""

from dataclasses import dataclass

from edgetune.errors import EdgetuneError

# IA3's modules as in its paper: the keys, the values and the feed-forward intermediate (down_proj's
# input, scaled before the matmul). PEFT's own default differs by architecture (q_proj on Qwen).
IA3_TARGETS = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD = ("down_proj",)


@dataclass(frozen=True)
class Method:
    name: str  # the --method value
    title: str  # how docs and messages write it
    peft_type: str  # adapter_config.json's peft_type
    kind: str  # "low-rank", "scaling", "embeddings" (virtual tokens) or "prefix" (keys and values)
    # Why llama.cpp cannot load it as a GGUF adapter over the base; None when it can.
    no_gguf_adapter: str | None = None

    @property
    def folds(self) -> bool:
        """Whether the trained method merges into the base weights (an exported model carries it)."""
        return self.kind in ("low-rank", "scaling")

    @property
    def soft_prompt(self) -> bool:
        """Virtual token embeddings prepended to the input: carried beside a GGUF as input embeddings."""
        return self.kind == "embeddings"

    @property
    def virtual_tokens(self) -> bool:
        return self.kind in ("embeddings", "prefix")

    @property
    def ranked(self) -> bool:
        return self.kind == "low-rank"

    @property
    def fused(self) -> bool:
        """Whether edgetune's fused layers (edgetune.train.lora, edgetune.train.dora) run it over a
        dense base; the others use PEFT's forward."""
        return self.name in ("lora", "rslora", "dora")


_FULL_RANK = ("rescales every row of the base weight, which no low-rank adapter can express; "
              "export the merged model instead (--gguf q8_0)")
METHODS = {m.name: m for m in (
    Method("lora", "LoRA", "LORA", "low-rank"),
    Method("dora", "DoRA", "LORA", "low-rank", no_gguf_adapter=f"DoRA's magnitude vector {_FULL_RANK}"),
    Method("rslora", "rsLoRA", "LORA", "low-rank"),
    Method("adalora", "AdaLoRA", "ADALORA", "low-rank"),
    Method("ia3", "IA3", "IA3", "scaling", no_gguf_adapter=f"IA3's learned scaling {_FULL_RANK}"),
    Method("prompt", "prompt tuning", "PROMPT_TUNING", "embeddings",
           no_gguf_adapter="a soft prompt is not a weight adapter; --gguf writes the base model with "
                           "the virtual token embeddings beside it (edgetune run --soft-prompt)"),
    Method("ptuning", "P-tuning", "P_TUNING", "embeddings",
           no_gguf_adapter="a soft prompt is not a weight adapter; --gguf writes the base model with "
                           "the virtual token embeddings beside it (edgetune run --soft-prompt)"),
    Method("prefix", "prefix tuning", "PREFIX_TUNING", "prefix",
           no_gguf_adapter="prefix tuning's per-layer keys and values have no GGUF form that llama.cpp "
                           "loads"),
)}
NAMES = tuple(METHODS)


def method(name: str | None) -> Method:
    """The table entry for a --method value (None: LoRA)."""
    if name is None:
        return METHODS["lora"]
    if name not in METHODS:
        raise EdgetuneError(f"--method {name}: unknown method; known: {', '.join(NAMES)}")
    return METHODS[name]


def method_of(adapter_config: dict) -> Method:
    """The method a PEFT adapter_config.json describes; one this table lacks is an error naming it."""
    peft_type = adapter_config.get("peft_type") or "LORA"
    if peft_type == "LORA":
        if adapter_config.get("use_dora"):
            return METHODS["dora"]
        return METHODS["rslora" if adapter_config.get("use_rslora") else "lora"]
    for entry in METHODS.values():
        if entry.peft_type == peft_type and entry.peft_type != "LORA":
            return entry
    known = sorted({m.peft_type for m in METHODS.values()})
    raise EdgetuneError(f"adapter type {peft_type} is not supported; supported: {', '.join(known)}")
