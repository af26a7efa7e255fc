"""Device profiles: loading, checking, and choosing an export that fits (no torch needed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgetune.devices.profiles import BUILTIN_DIR, REQUIRED, SOURCED, get, load_file, load_profiles
from edgetune.devices.selection import (BITS_PER_WEIGHT, as_shape, choose_export, fits, max_context,
                                        predict)
from edgetune.errors import EdgetuneError
from edgetune.shape import ModelShape, shape_from_config

REQUIRED_DEVICES = ["rpi4-4gb", "rpi4-8gb", "rpi5-8gb", "android-8gb", "iphone-6gb",
                    "jetson-orin-nano-8gb", "laptop-8gb", "laptop-16gb"]
# SmolLM2-135M's config.json numbers.
SMOLLM2 = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
           "tie_word_embeddings": True}
# A 7B llama (Llama-2-7B's numbers): 6.7B parameters.
LLAMA_7B = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
            "tie_word_embeddings": False}


@pytest.fixture(autouse=True)
def no_user_profiles(tmp_path, monkeypatch):
    """Tests see the built-in profiles only, unless they write into this folder."""
    user = tmp_path / "devices"
    user.mkdir()
    monkeypatch.setenv("EDGETUNE_DEVICES", str(user))
    return user


def untied_shape() -> ModelShape:
    return shape_from_config(LLAMA_7B)


def model_dir(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_builtin_profiles_load_with_required_keys_and_sources():
    import yaml

    profiles = load_profiles()
    assert set(REQUIRED_DEVICES) <= set(profiles)
    for path in BUILTIN_DIR.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        assert set(REQUIRED) <= set(data), path
        for key in SOURCED:
            assert len(str(data["sources"][key]).split()) >= 4, f"{path.name}: source of {key} is too thin"
    pi5 = profiles["rpi5-8gb"]
    assert pi5.ram_bytes == 8 * 2**30 and pi5.cores == 4 and "dotprod" in pi5.isa
    assert pi5.usable_bytes == int(8 * 2**30 * 0.85)
    assert profiles["iphone-6gb"].formats == ("executorch", "gguf", "onnx")
    assert profiles["android-8gb"].formats == ("executorch", "litert", "gguf", "onnx", "onnx-generic")


def test_parameter_count_matches_smollm2():
    assert shape_from_config(SMOLLM2).params == 134_515_008  # SmolLM2-135M's parameter count
    assert as_shape(SMOLLM2) == shape_from_config(SMOLLM2)


def test_prediction_terms():
    shape = shape_from_config(SMOLLM2)
    pi5 = get("rpi5-8gb")
    choice = predict(pi5, shape, 2048, "gguf", "q8_0")
    matrices = shape.linear_params + shape.embedding_params  # norms are noise beside them
    assert choice.weights_bytes == int(matrices * 8.5 / 8)
    assert choice.kv_cache_bytes == 2 * 30 * 3 * 64 * 2 * 2048  # K and V, f16, 2048 positions
    assert choice.total_bytes == choice.weights_bytes + choice.kv_cache_bytes + choice.overhead_bytes
    read = matrices * 8.5 / 8 + choice.kv_cache_bytes
    assert choice.tokens_per_s == pytest.approx(17.1e9 * 0.5 / read)
    # ONNX int8 of a tied model shares one fp32 matrix for embedding and output (onnx_genai.py).
    onnx = predict(pi5, shape, 2048, "onnx", "int8")
    assert onnx.weights_bytes == int((shape.linear_params * 9 + shape.token_embedding_params * 32) / 8)
    assert onnx.kv_cache_bytes == 2 * choice.kv_cache_bytes  # fp32 cache
    untied = predict(pi5, as_shape(LLAMA_7B), 2048, "onnx", "int4")
    assert untied.weights_bytes == int((untied_shape().linear_params * 5 + untied_shape().token_embedding_params
                                        * (32 + 5)) / 8)  # fp32 embedding + int4 output projection


def test_selection_prefers_q8_0_when_it_fits(tmp_path):
    folder = model_dir(tmp_path, SMOLLM2)
    assert choose_export("rpi5-8gb", folder, 2048) == ["gguf:q8_0"]
    names = [c.name for c in fits("rpi5-8gb", folder, 2048).choices]
    assert names == ["gguf:q8_0", "onnx:int8", "onnx-generic:int8"]  # one per format, preferred first
    assert [c.name for c in fits("iphone-6gb", folder, 2048).choices] == ["executorch:8da8w", "gguf:q8_0",
                                                                         "onnx:int8"]


def test_selection_falls_back_to_a_smaller_quant(tmp_path):
    folder = model_dir(tmp_path, LLAMA_7B)
    # 6.7B at q8_0 is about 6.7 GiB: too much for the 6.8 GiB a Pi 5 gives one app with the cache.
    picked = choose_export("rpi5-8gb", folder, 2048)
    assert picked == ["gguf:q6_k"]
    order = list(BITS_PER_WEIGHT["gguf"])
    target = fits("rpi5-8gb", folder, 2048)
    best = target.choices[0]
    assert best.total_bytes <= get("rpi5-8gb").usable_bytes
    better = order[order.index(best.quant) - 1]
    assert predict(get("rpi5-8gb"), folder, 2048, "gguf", better).total_bytes > get("rpi5-8gb").usable_bytes


def test_refusal_names_a_context_and_a_device_that_work(tmp_path):
    folder = model_dir(tmp_path, LLAMA_7B)
    with pytest.raises(EdgetuneError) as err:
        choose_export("rpi4-4gb", folder, 4096)
    message = str(err.value)
    assert "rpi4-4gb" in message and "4096" in message
    # 7B at q4_k_m (3.8 GiB) does not fit in 3 GiB at any context: only a larger device helps.
    assert "a device such as" in message and "--ctx" not in message
    suggested = message.split("a device such as ")[1].split()[0]
    assert fits(suggested, folder, 4096).fits

    # On the largest device the weights fit but a 32k cache (16 GiB in f16) does not: a context helps.
    with pytest.raises(EdgetuneError) as err:
        choose_export("laptop-16gb", folder, 32768)
    message = str(err.value)
    ctx = max_context(get("laptop-16gb"), as_shape(LLAMA_7B))
    assert f"--ctx {ctx}" in message and 4096 <= ctx < 32768
    assert fits("laptop-16gb", folder, ctx).fits and not fits("laptop-16gb", folder, ctx + 256).fits


def test_user_profile_is_loaded_and_overrides(no_user_profiles):
    text = (BUILTIN_DIR / "rpi5-8gb.yaml").read_text().replace("ram: 8gb", "ram: 4gb")
    (no_user_profiles / "rpi5-4gb.yaml").write_text(text)
    (no_user_profiles / "rpi5-8gb.yaml").write_text(text.replace("cores: 4", "cores: 3"))
    profiles = load_profiles()
    assert profiles["rpi5-4gb"].ram_bytes == 4 * 2**30
    assert profiles["rpi5-8gb"].cores == 3


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t + "gpu: videocore\n", "unknown key 'gpu'"),
    (lambda t: t.replace("cores: 4\n", ""), "missing key 'cores'"),
    (lambda t: t.replace("runtimes: [llama.cpp", "runtimes: [mlc"), "runtimes"),
    (lambda t: t.replace("usable_share: 0.85", "usable_share: 1.5"), "usable_share"),
    (lambda t: t.replace("ram: 8gb", "ram: lots"), "cannot read size 'lots'"),
    (lambda t: "\n".join(line for line in t.splitlines() if not line.startswith("  cores:")), "'cores'"),
])
def test_bad_user_profile_is_a_clear_error(no_user_profiles, edit, expected):
    bad = no_user_profiles / "mypi.yaml"
    bad.write_text(edit((BUILTIN_DIR / "rpi5-8gb.yaml").read_text()))
    with pytest.raises(EdgetuneError, match="mypi.yaml") as err:
        load_profiles()
    assert expected in str(err.value)
    with pytest.raises(EdgetuneError, match="mypi.yaml"):
        load_file(bad)


def test_unknown_device_lists_known_ones():
    with pytest.raises(EdgetuneError, match="known devices: .*rpi5-8gb"):
        fits("rpi9", SMOLLM2, 2048)


def test_shape_from_a_shape_a_config_or_a_folder(tmp_path):
    shape = shape_from_config(SMOLLM2, "smollm2")
    assert as_shape(shape) is shape
    assert as_shape(SMOLLM2) == shape_from_config(SMOLLM2)
    assert as_shape(model_dir(tmp_path, SMOLLM2)).linear_params == shape.linear_params
    assert fits("rpi5-8gb", shape, 2048).fits


def test_devices_cli_lists_profiles_without_torch(tmp_path):
    folder = model_dir(tmp_path, SMOLLM2)
    code = ("import sys; from edgetune.cli import main; rc = main(['devices', '--model', sys.argv[1], "
            "'--ctx', '1024']); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in REQUIRED_DEVICES:
        assert name in out.stdout
    assert "gguf:q8_0" in out.stdout
    shown = subprocess.run([sys.executable, "-m", "edgetune", "devices", "--show", "rpi5-8gb"],
                           capture_output=True, text=True)
    assert shown.returncode == 0 and "LPDDR4X-4267" in shown.stdout
    missing = subprocess.run([sys.executable, "-m", "edgetune", "devices", "--show", "rpi9"],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.startswith("edgetune: unknown device 'rpi9'")
    assert "Traceback" not in missing.stderr
