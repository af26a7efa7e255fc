"""`edgetune merge`: each method against PEFT's own functions and the exact sum, the output as an
ordinary run, and bad input refused in one line with nothing written."""

import json

import pytest
import torch
import yaml
from conftest import build_adapter
from safetensors.torch import load_file

from edgetune import cli
from edgetune.export.algebra import peft_merge_utils
from edgetune.export.merge import load_adapter

WEIGHTS = (0.6, 0.4)


def as_run(adapter, model_dir, **settings):
    """A PEFT adapter folder made into an `edgetune train` run folder."""
    saved = {"model": str(model_dir), "cache_dir": None, "eval_data": None, **settings}
    (adapter / "edgetune_run.yaml").write_text(yaml.safe_dump(saved))
    return adapter


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Two runs on the tiny model: rank 4 alpha 8, and rank 4 rsLoRA alpha 8 (another scale rule)."""
    root = tmp_path_factory.mktemp("merge_runs")
    a = as_run(build_adapter(tiny_model, root / "a", rank=4, alpha=8.0, seed=1), tiny_model)
    b = as_run(build_adapter(tiny_model, root / "b", rank=4, alpha=8.0, rslora=True, seed=2),
               tiny_model, method="rslora")
    return a, b


def updates(run) -> dict:
    """Each layer's dense update scale * B @ A in float64."""
    return {name: pair.scale * (pair.b.double() @ pair.a.double())
            for name, pair in load_adapter(run).items()}


def merge(*args) -> int:
    return cli.main(["merge", *map(str, args)])


def test_linear_at_the_sum_of_ranks_is_exact(tiny_model, runs, tmp_path, capsys):
    out = tmp_path / "ab"
    assert merge(*runs, "--weights", "0.6,0.4", "--output", out) == 0
    expected = {k: WEIGHTS[0] * v + WEIGHTS[1] * updates(runs[1])[k] for k, v in updates(runs[0]).items()}
    got = updates(out)
    assert set(got) == set(expected) and len(got) == 14
    for name, value in expected.items():
        assert (got[name] - value).abs().max() <= 1e-6 * value.abs().max(), name  # float precision
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (8, 8, False)
    saved = yaml.safe_load((out / "edgetune_run.yaml").read_text())
    assert saved["model"] == str(tiny_model)
    assert (saved["method"], saved["rank"], saved["alpha"]) == ("lora", 8, 8)
    assert saved["merge"]["weights"] == list(WEIGHTS) and saved["merge"]["method"] == "linear"
    assert saved["merge"]["inputs"] == [str(r.resolve()) for r in runs]
    assert "energy kept at rank 8: min 100.00%" in capsys.readouterr().out
    assert not list(tmp_path.glob(".ab.*"))


def test_linear_at_an_explicit_rank_of_the_sum_of_uneven_ranks(tiny_model, runs, tmp_path):
    """Three runs of ranks 4, 4 and 2 (alpha 3) at --rank 10: the factors hold sum(w_i * dW_i)."""
    third = as_run(build_adapter(tiny_model, tmp_path / "c", rank=2, alpha=3.0, seed=3), tiny_model)
    out = tmp_path / "abc"
    weights = (0.5, 0.3, 0.2)
    assert merge(*runs, third, "--weights", "0.5,0.3,0.2", "--rank", "10", "--output", out) == 0
    inputs = [updates(run) for run in (*runs, third)]
    got = updates(out)
    for name, value in got.items():
        expected = sum(w * dw[name] for w, dw in zip(weights, inputs))
        assert (value - expected).abs().max() <= 1e-6 * expected.abs().max(), name
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 10


def test_the_merged_run_is_a_peft_adapter(tiny_model, runs, tmp_path):
    """PEFT loads the output; its logits equal PEFT's own model with both inputs at 0.6 and 0.4."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ab"
    assert merge(*runs, "--weights", "0.6,0.4", "--output", out) == 0
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]])

    def logits(*adapters, scales=None):
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapters[0],
            adapter_name="0")
        for i, adapter in enumerate(adapters[1:], 1):
            model.load_adapter(adapter, adapter_name=str(i))
        model.base_model.set_adapter([str(i) for i in range(len(adapters))])
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for i, scale in enumerate(scales or []):
                    module.set_scale(str(i), scale)
        with torch.no_grad():
            return model(ids).logits

    reference = logits(*runs, scales=WEIGHTS)
    assert torch.allclose(logits(out), reference, atol=1e-5)
    assert (logits(runs[0]) - reference).abs().max() > 0.05  # the second adapter matters


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_dense_methods_are_pefts_functions(method, runs, tmp_path, capsys):
    """At full rank (k/v projections are 32x64 here) the factors reproduce PEFT's combination of the
    dense updates exactly; the 64x64 layers keep only part of their energy at rank 32."""
    out = tmp_path / method
    assert merge(*runs, "--method", method, "--density", "0.3", "--rank", "32", "--seed", "5",
                 "--output", out) == 0
    utils = peft_merge_utils()
    name = "model.layers.1.self_attn.k_proj.weight"
    index = sorted(updates(runs[0])).index(name)
    torch.manual_seed(5 * 1_000_003 + index)  # the layer's seed (edgetune.merge._layer_seed)
    inputs = [updates(r)[name].float() for r in runs]
    combine = {"ties": utils.ties, "dare_ties": utils.dare_ties, "dare_linear": utils.dare_linear}
    expected = combine[method](inputs, torch.tensor([1.0, 1.0]), 0.3).double()
    got = updates(out)[name]
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    text = capsys.readouterr().out
    assert "energy kept at rank 32: min " in text and "min 100.00%" not in text
    saved = yaml.safe_load((out / "edgetune_run.yaml").read_text())["merge"]
    assert 0 < saved["energy_kept"]["min"] < saved["energy_kept"]["median"] <= 1
    if method != "ties":  # DARE's drops follow --seed
        again = tmp_path / "again"
        assert merge(*runs, "--method", method, "--density", "0.3", "--rank", "32", "--seed", "6",
                     "--output", again) == 0
        assert not torch.equal(updates(again)[name], got)


def test_svd_truncation_keeps_the_top_singular_values(runs, tmp_path, capsys):
    out = tmp_path / "svd"
    assert merge(*runs, "--method", "svd", "--rank", "2", "--output", out) == 0
    exact = {k: v + updates(runs[1])[k] for k, v in updates(runs[0]).items()}
    got = updates(out)
    worst = 1.0
    for name, value in exact.items():
        s = torch.linalg.svdvals(value)
        best = (s[:2].square().sum() / s.square().sum()).item()
        kept = 1 - ((got[name] - value).square().sum() / value.square().sum()).item()
        assert kept == pytest.approx(best, abs=1e-6), name  # the optimal rank-2 approximation
        worst = min(worst, best)
    assert f"min {worst:.2%}" in capsys.readouterr().out
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2


def test_cat_stacks_the_inputs_exactly(runs, tmp_path):
    out = tmp_path / "cat"
    assert merge(*runs, "--method", "cat", "--weights", "0.6,0.4", "--output", out) == 0
    raw = load_file(out / "adapter_model.safetensors")
    a = raw["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    first = load_file(runs[0] / "adapter_model.safetensors")
    assert a.shape == (8, 64) and torch.equal(a[:4], first[
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"])
    expected = {k: 0.6 * v + 0.4 * updates(runs[1])[k] for k, v in updates(runs[0]).items()}
    for name, value in updates(out).items():
        assert (value - expected[name]).abs().max() <= 1e-6 * expected[name].abs().max()


def test_cat_of_uneven_ranks_holds_one_alpha(tiny_model, runs, tmp_path):
    """A run whose q_proj has rank 2 (PEFT's rank_pattern): cat gives q_proj rank 6 and the rest 8,
    with one lora_alpha, so the merged run still exports as a GGUF adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgetune.export.gguf import write_adapter_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  rank_pattern={"q_proj": 2}, task_type="CAUSAL_LM"))
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "uneven")
    uneven = as_run(tmp_path / "uneven", tiny_model)
    out = tmp_path / "cat"
    assert merge(runs[0], uneven, "--method", "cat", "--weights", "0.6,0.4", "--output", out) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["alpha_pattern"]) == (8, 8, {})
    assert set(config["rank_pattern"].values()) == {6} and len(config["rank_pattern"]) == 2
    expected = {k: 0.6 * v + 0.4 * updates(uneven)[k] for k, v in updates(runs[0]).items()}
    for name, value in updates(out).items():
        assert (value - expected[name]).abs().max() <= 1e-6 * expected[name].abs().max(), name
    assert write_adapter_gguf(tiny_model, out, tmp_path / "cat.gguf") == 8.0  # the one alpha


def test_full_writes_the_merged_model(tiny_model, runs, tmp_path):
    out = tmp_path / "full"
    assert merge(*runs, "--weights", "0.6,0.4", "--full", "--output", out) == 0
    merged, base = load_file(out / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = base[name].double() + 0.6 * updates(runs[0])[name] + 0.4 * updates(runs[1])[name]
    assert (merged[name].double() - expected).abs().max() < 1e-6
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    assert yaml.safe_load((out / "edgetune_merge.yaml").read_text())["merge"]["full"] is True
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_a_merged_run_exports_and_merges_again(runs, tmp_path, capsys):
    out = tmp_path / "ab"
    assert merge(*runs, "--output", out) == 0
    assert cli.main(["report", str(out)]) == 0
    assert "linear (weights 1, 1) at rank 8; energy kept min 100.00%" in capsys.readouterr().out
    assert cli.main(["export", str(out), "--gguf-adapter", "--positions", "64"]) == 0
    report = json.loads((out / "export" / "report.json").read_text())
    assert report[0]["passed"] and report[0]["format"] == "gguf adapter over f16"
    again = tmp_path / "again"
    assert merge(out, runs[0], "--method", "svd", "--output", again) == 0
    assert json.loads((again / "adapter_config.json").read_text())["r"] == 8  # the largest input


def test_a_merged_run_runs_in_llama_cpp_like_its_inputs_stacked(tiny_model, runs, tmp_path, capsys):
    """The merged run exported as an adapter GGUF (`--gguf-adapter`) and as a merged f16 GGUF, each
    verified by export, and `edgetune run` with the adapter: llama.cpp gives the logits of the two
    input adapters stacked at 0.6 and 0.4."""
    import numpy as np

    from edgetune.export.gguf import write_adapter_gguf
    from edgetune.export.llama import gguf_logits

    out = tmp_path / "ab"
    assert merge(*runs, "--weights", "0.6,0.4", "--output", out) == 0
    assert cli.main(["export", str(out), "--gguf", "f16", "--gguf-adapter", "--positions", "64"]) == 0
    report = json.loads((out / "export" / "report.json").read_text())
    assert [row["passed"] for row in report] == [True, True], report
    ggufs = {p.name: p for p in (out / "export").glob("*.gguf")}
    adapter = next(p for name, p in ggufs.items() if "adapter" in name)
    base = next(p for name, p in ggufs.items() if "adapter" not in name and "f16" in name)
    for run in runs:
        write_adapter_gguf(tiny_model, run, tmp_path / f"{run.name}.gguf")
    ids = [int(i) for i in np.random.default_rng(3).integers(3, 250, 48)]
    inputs = [(tmp_path / "a.gguf", 0.6), (tmp_path / "b.gguf", 0.4)]
    stacked, _ = gguf_logits(base, ids, adapters=inputs)
    merged, _ = gguf_logits(base, ids, lora=adapter)
    alone, _ = gguf_logits(base, ids, lora=tmp_path / "a.gguf")
    assert np.abs(merged - stacked).max() < 2e-3  # f16 activations; the updates are equal
    assert np.abs(alone - stacked).max() > 0.05  # the second input matters
    assert cli.main(["run", str(base), "--prompt", "Hi", "--max-tokens", "4", "--lora", str(adapter)]) == 0


def test_a_full_merge_exports_as_a_model(runs, tmp_path):
    out = tmp_path / "full"
    assert merge(*runs, "--weights", "0.6,0.4", "--full", "--output", out) == 0
    assert cli.main(["export", str(out), "--gguf", "f16", "--positions", "64",
                     "--output", str(tmp_path / "exported")]) == 0
    report = json.loads((tmp_path / "exported" / "report.json").read_text())
    assert report[0]["passed"], report


def test_the_merged_run_keeps_the_first_runs_template_and_data(tiny_model, runs, tmp_path, capsys):
    """Export reads the run's chat template and data (held-out text, imatrix calibration)."""
    import shutil

    first = shutil.copytree(runs[0], tmp_path / "first")
    as_run(first, tiny_model, data="/data/a.jsonl", eval_split=0.1, seq_len=128, steps=40)
    (first / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    out = tmp_path / "ab"
    assert merge(first, runs[1], "--output", out) == 0
    assert (out / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}"
    assert f"{runs[1]} trained with another chat template than {first}" in capsys.readouterr().err
    saved = yaml.safe_load((out / "edgetune_run.yaml").read_text())
    assert (saved["data"], saved["eval_split"], saved["seq_len"]) == ("/data/a.jsonl", 0.1, 128)
    assert "steps" not in saved  # the merged run was not trained


def test_an_input_in_training_is_refused_and_merges_lock_names_merge(runs, tmp_path, capsys):
    from edgetune import folders
    from edgetune.errors import EdgetuneError
    from edgetune.export.command import run_lock, run_source

    with folders.folder_lock(runs[0], "run folder", verb="edgetune train"):
        assert merge(*runs, "--output", tmp_path / "ab") == 1
    assert "(edgetune train): wait for it to finish" in capsys.readouterr().err
    assert not (tmp_path / "ab").exists()
    with run_lock(run_source(runs[0]), verb="edgetune merge"):
        with pytest.raises(EdgetuneError, match=r"in use by PID \d+ \(edgetune merge\)"):
            with folders.folder_lock(runs[0], "run folder", verb="edgetune train"):
                pass


def test_force_replaces_only_edgetune_folders(runs, tmp_path, capsys):
    out = tmp_path / "ab"
    assert merge(*runs, "--output", out) == 0
    assert merge(*runs, "--output", out) == 1
    assert "exists: pass --force" in capsys.readouterr().err
    assert merge(*runs, "--output", out, "--force", "--method", "svd") == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert merge(*runs, "--output", mine, "--force") == 1
    assert "holds notes.txt, which edgetune did not make" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep me"


def _rewrite(folder, name, edit):
    path = folder / name
    data = json.loads(path.read_text()) if name.endswith(".json") else yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))


@pytest.fixture(scope="module")
def odd_runs(tiny_model, tiny_factory, runs, tmp_path_factory):
    """Runs that must not merge with `runs[0]`, by what is wrong with them."""
    import shutil

    root = tmp_path_factory.mktemp("odd")
    qwen2 = tiny_factory("qwen2")
    made = {"other base": as_run(build_adapter(qwen2, root / "qwen2"), qwen2)}
    for name, file, edit in [
            ("dora run", "edgetune_run.yaml", lambda d: d.update(method="dora")),
            ("ia3 adapter", "adapter_config.json", lambda d: d.update(peft_type="IA3")),
            ("dora adapter", "adapter_config.json", lambda d: d.update(use_dora=True))]:
        made[name] = shutil.copytree(runs[0], root / name.replace(" ", "_"))
        _rewrite(made[name], file, edit)
    fewer = shutil.copytree(runs[0], root / "fewer")
    tensors = load_file(fewer / "adapter_model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v for k, v in tensors.items() if "mlp" not in k}, fewer / "adapter_model.safetensors")
    made["fewer modules"] = fewer
    (root / "not_a_run").mkdir()
    made["not a run"] = root / "not_a_run"
    return made


@pytest.mark.parametrize("case,args,expected", [
    ("two", ["--weights", "0.6,0.3,0.1"], "--weights 0.6,0.3,0.1: 3 weights for 2 runs"),
    ("two", ["--weights", "0.6,-0.4"], "--weights 0.6,-0.4: -0.4 is not allowed"),
    ("two", ["--weights", "0,0"], "--weights 0,0: all weights are 0"),
    ("two", ["--weights", "0.6,x"], "--weights 0.6,x: 'x' is not a number"),
    ("two", ["--rank", "0"], "--rank must be at least 1, got 0"),
    ("two", ["--rank", "33"], "--rank 33 is more than model.layers.0.self_attn.k_proj (32x64)"),
    ("two", ["--method", "cat", "--rank", "4"], "merged rank is 8, not --rank 4"),
    ("two", ["--density", "0.5"], "--density applies to ties, dare_ties, dare_linear"),
    ("two", ["--method", "ties", "--density", "1.5"], "--density must be in (0, 1], got 1.5"),
    ("two", ["--full", "--rank", "4"], "--rank has no effect with --full"),
    ("other base", [], "adapters of different base models cannot be merged"),
    ("fewer modules", [], "adapt different modules (only "),
    ("dora run", [], "was trained with --method dora: only LoRA adapters"),
    ("ia3 adapter", [], "adapter type IA3 is not supported"),
    ("dora adapter", [], "DoRA adapters are not supported"),
    ("not a run", [], "is not a LoRA run: it has no adapter_config.json"),
    ("missing", [], "does not exist"),
])
def test_bad_merges_are_refused_in_one_line(case, args, expected, runs, odd_runs, tmp_path, capsys):
    second = {"two": runs[1], "missing": tmp_path / "missing"}.get(case) or odd_runs[case]
    out = tmp_path / "out"
    code = merge(runs[0], second, *args, "--output", out)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("edgetune: "), err
    assert expected in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("where", ["the run", "its parent"])
def test_an_output_that_would_replace_an_input_is_refused(where, runs, tmp_path, capsys):
    import shutil

    run = shutil.copytree(runs[0], tmp_path / "parent" / "run")
    out = run if where == "the run" else run.parent
    assert merge(run, runs[1], "--output", out, "--force") == 1
    assert f"--output {out} holds the input run {run}" in capsys.readouterr().err
    assert (run / "adapter_model.safetensors").is_file()


def test_the_planner_predicts_the_merge_term_by_term(tiny_model):
    from edgetune.plan.merge import MERGE_RUNTIME_BYTES, merge_peak, merge_terms
    from edgetune.shape import shape_from_model_dir

    shape = shape_from_model_dir(tiny_model)  # largest linear 64x128, widest in + out 192
    terms = merge_terms(shape, [4, 4], "linear")
    assert terms == {"runtime (torch)": MERGE_RUNTIME_BYTES,
                     "input adapters (mapped)": 2 * 4 * 2 * 4 * 1024,  # 2 runs, fp32, rank 4
                     "one layer's updates": 4 * 8192 * (1 * 2 + 9)}
    assert merge_peak(shape, [4, 4], "ties") > merge_peak(shape, [4, 4], "linear")
    assert merge_terms(shape, [4, 4], "cat")["one layer's factors"] == 4 * 192 * 8
    full = merge_terms(shape, [4, 4], "cat", full=True)  # merged whole: as linear
    assert full["one layer's updates"] == terms["one layer's updates"]
    assert full["base checkpoint (mapped)"] == 4 * shape.params  # the fixture is saved in fp32
