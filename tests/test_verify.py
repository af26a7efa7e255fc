"""Verification by KL divergence: good files pass with room to spare, injected faults fail by far.

The faults are real export bugs, injected into the writer and checked through llama.cpp on a tiny
model trained for a few seconds (conftest.train_tiny): a random tiny model is near-uniform, so its
faults and its rounding both move it little.
"""

import json

import numpy as np
import pytest
import torch
from conftest import build_adapter

from edgetune import cli
from edgetune.errors import EdgetuneError
from edgetune.export import gguf as gguf_export
from edgetune.export import merge as merge_module
from edgetune.export.gate import GATES, Gate, distance, information
from edgetune.export.gguf import write_adapter_gguf, write_gguf
from edgetune.export.heldout import builtin_mix, held_out_ids
from edgetune.export.merge import LoraPair, merge
from edgetune.export.verify import (Reference, VerificationFailed, compare, reference,
                                    require_passed, torch_reference, verify_gguf)
from edgetune.metrics import perplexity

LOOSEST = max(g.max_relative_kld for g in GATES.values())
# A fault "fails by a wide margin": at least this many times the loosest gate's bar.
WIDE = 10


@pytest.fixture(scope="module")
def held_ids(tiny_trained):
    from transformers import AutoTokenizer

    return held_out_ids(AutoTokenizer.from_pretrained(tiny_trained), [], 128)


@pytest.fixture(scope="module")
def trained_reference(tiny_trained, held_ids) -> Reference:
    return torch_reference(tiny_trained, held_ids)


def _with_tensors(monkeypatch, change) -> None:
    """Make the GGUF writer see the model's tensors after `change(name, array) -> (name, array)`."""
    original = gguf_export._hf_tensors
    monkeypatch.setattr(gguf_export, "_hf_tensors",
                        lambda model_dir: (change(n, a) for n, a in original(model_dir)))


def _skip_rotary_permutation(monkeypatch):
    monkeypatch.setitem(gguf_export.ARCHITECTURES, "llama", gguf_export.Arch("LLAMA", permute_qk=False))


def _swap_layers(monkeypatch):
    swap = {"layers.0.": "layers.1.", "layers.1.": "layers.0."}

    def rename(name, array):
        return next((name.replace(k, v) for k, v in swap.items() if k in name), name), array

    _with_tensors(monkeypatch, rename)


def _shift_token_ids(monkeypatch):
    # Every id reads its neighbour's embedding: what a vocabulary off by one token does.
    _with_tensors(monkeypatch, lambda n, a: (n, np.roll(a, 1, axis=0) if "embed_tokens" in n else a))


def _norm_plus_one(monkeypatch):
    # The (1 + w) RMSNorm convention of Gemma applied to a Llama norm: top-1 barely moves.
    _with_tensors(monkeypatch, lambda n, a: (n, a + 1 if n == "model.norm.weight" else a))


def _wrong_rope_base(monkeypatch):
    rope = gguf_export._rope
    monkeypatch.setattr(gguf_export, "_rope", lambda config: (rope(config)[0] * 100, *rope(config)[1:]))


FAULTS = {"rotary permutation skipped": _skip_rotary_permutation, "two layers swapped": _swap_layers,
          "token ids shifted by one": _shift_token_ids, "norm weight +1": _norm_plus_one,
          "rope base x100": _wrong_rope_base}


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_good_files_pass_with_room(kind, tiny_trained, trained_reference, tmp_path):
    write_gguf(tiny_trained, tmp_path / "model.gguf", kind)
    row = verify_gguf(tmp_path, "model.gguf", kind, trained_reference)
    assert row.passed and row.failures == []
    assert row.relative_kld < GATES[kind].max_relative_kld / 5
    assert row.clear_positions >= 20 and row.clear_top1 == 1.0


@pytest.mark.parametrize("fault", FAULTS)
def test_injected_fault_fails_by_a_wide_margin(fault, tiny_trained, trained_reference, tmp_path,
                                               monkeypatch):
    FAULTS[fault](monkeypatch)
    write_gguf(tiny_trained, tmp_path / "model.gguf", "f16")
    row = verify_gguf(tmp_path, "model.gguf", "f16", trained_reference)
    assert not row.passed and "relative KLD" in row.failures[0]
    assert row.relative_kld > WIDE * LOOSEST, row.relative_kld


def _swapped(pair: LoraPair) -> LoraPair:
    """lora_a and lora_b exchanged (transposed so they still load): the update B @ A turns into
    its transpose, which only a square module can take."""
    return LoraPair(pair.module, pair.b.T.contiguous(), pair.a.T.contiguous(), pair.rank, pair.alpha,
                    pair.rslora)


@pytest.fixture(scope="module")
def square_adapter(tiny_trained, tmp_path_factory):
    """An adapter on the 64x64 q and o projections, large enough to change the model clearly."""
    return build_adapter(tiny_trained, tmp_path_factory.mktemp("square") / "adapter",
                         modules=["q_proj", "o_proj"], b_std=0.3)


def test_adapter_with_lora_a_and_b_swapped_fails(tiny_trained, square_adapter, held_ids, tmp_path,
                                                 monkeypatch):
    merged = merge(tiny_trained, square_adapter, tmp_path / "merged")
    ref = torch_reference(merged, held_ids)
    write_gguf(tiny_trained, tmp_path / "base.gguf", "f16")
    write_adapter_gguf(tiny_trained, square_adapter, tmp_path / "good.gguf")
    good = verify_gguf(tmp_path, "base.gguf", "f16", ref, lora="good.gguf")
    assert good.passed and good.relative_kld < GATES["f16"].max_relative_kld / 5
    load = merge_module.load_adapter
    monkeypatch.setattr(merge_module, "load_adapter",
                        lambda d: {k: _swapped(p) for k, p in load(d).items()})
    write_adapter_gguf(tiny_trained, square_adapter, tmp_path / "swapped.gguf")
    bad = verify_gguf(tmp_path, "base.gguf", "f16", ref, lora="swapped.gguf")
    assert not bad.passed and bad.relative_kld > WIDE * LOOSEST, bad.relative_kld


def test_measures_on_known_distributions():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(64, 50))
    exact = distance(logits.copy(), logits)
    assert exact.kld.max() < 1e-12 and exact.top1.all() and exact.max_logit_diff == 0.0
    flat = distance(np.zeros_like(logits), logits)  # a file that knows nothing
    assert np.isclose(flat.kld.mean(), information(logits))  # relative KLD 1 by definition
    two = np.full((1, 4), -50.0)
    two[0, :2] = [1.5, 0.4]  # torch's top token leads by 1.1 nats: a clear margin
    assert distance(two[:, ::-1].copy(), two).clear_top1 == 0.0
    two[0, 1] = 1.0  # 0.5 nats: a near-tie, not counted
    assert distance(two[:, ::-1].copy(), two).clear_top1 is None


def test_failure_names_measure_threshold_and_way_out():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(256, 50)).astype(np.float32)
    ids = [int(i) for i in rng.integers(0, 50, 257)]
    ref = reference(ids, logits)
    assert np.isclose(ref.perplexity, perplexity(logits, ids[1:]))
    exact = compare("a.gguf", "gguf f16", "f16", logits.copy(), ref, 10, 5.0)
    assert exact.passed and exact.relative_kld == 0 and exact.perplexity_ratio == 1.0
    noisy = logits + rng.normal(scale=2.0, size=logits.shape).astype(np.float32)
    low = compare("b.gguf", "gguf q4_0", "q4_0", noisy, ref, 10, None)
    assert low.passed and "q4_0 changes this model a lot" in low.note  # reported, not failed
    bad = compare("c.gguf", "gguf q8_0", "q8_0", noisy, ref, 10, None)
    assert not bad.passed
    with pytest.raises(VerificationFailed, match=r"c\.gguf \(gguf q8_0\): relative KLD \d+\.\d\d% "
                       r"\(mean \d\.\d{4} nats\) is above the 0\.50% allowed for q8_0; top-1 at the "
                       r"\d+ clear-margin positions is \d+\.\d%, below the 98% required.*nothing "
                       r"was written; --keep-failed.*--no-verify"):
        require_passed([exact, low, bad])
    with pytest.raises(VerificationFailed, match="kept in out.rejected"):
        require_passed([bad], kept="out.rejected")
    nan = compare("d.gguf", "gguf f16", "f16", np.full_like(logits, np.nan), ref, 10, None)
    assert not nan.passed and "not finite" in nan.failures[0]


def test_held_out_text_is_topped_up(tiny_model, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    short = [[5, 6, 7], [8, 9]]
    ids = held_out_ids(tokenizer, short, 300)
    assert len(ids) == 301 and ids[:5] == [5, 6, 7, 8, 9]
    assert ids[5:] == builtin_mix(tokenizer, 296)[0]
    said = capsys.readouterr().out
    assert "eval data has 5 tokens" in said and "prose, narrative, dialogue, code, numbers" in said
    assert held_out_ids(tokenizer, [list(range(400))], 256) == list(range(257))  # enough: no top-up
    with pytest.raises(EdgetuneError, match=r"--positions 99999 needs 100000 held-out tokens.*"
                                            r"use --positions \d+ or less"):
        held_out_ids(tokenizer, short, 99999)


def test_failed_export_kept_with_keep_failed(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(GATES, "f16", Gate(max_relative_kld=-1.0, min_clear_top1=1.0))  # none pass
    out = tmp_path / "out"
    argv = ["export", str(tiny_model), "--gguf", "f16", "--output", str(out)]
    assert cli.main(argv) == 1
    err, = [line for line in capsys.readouterr().err.splitlines() if line.startswith("edgetune:")]
    assert "above the -100.00% allowed for f16" in err and "--no-verify" in err
    assert list(tmp_path.iterdir()) == []
    assert cli.main(argv + ["--keep-failed"]) == 1
    assert f"kept in {out}.rejected" in capsys.readouterr().err
    kept = tmp_path / "out.rejected"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rejected"]
    assert sorted(p.name for p in kept.iterdir()) == ["edgetune_export.yaml", "model-f16.Modelfile",
                                                      "model-f16.gguf", "report.json", "report.md"]
    row, = json.loads((kept / "report.json").read_text())
    assert not row["passed"] and row["failures"] and row["relative_kld"] >= 0


def test_positions_beyond_every_text_is_refused(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["export", str(tiny_model), "--gguf", "f16", "--output", str(out),
                     "--positions", "100000"]) == 1
    assert "--positions 100000 needs 100001 held-out tokens" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_torch_reference_is_the_models_own_logits(tiny_model, held_ids):
    from transformers import AutoModelForCausalLM

    ref = torch_reference(tiny_model, held_ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([held_ids])).logits[0, :-1].numpy()
    assert np.allclose(ref.logits, logits, atol=1e-5) and ref.positions == 128
    assert 0 < ref.information < np.log(logits.shape[-1])
