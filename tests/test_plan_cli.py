"""`edgetune plan` end to end: sizes, output, JSON, errors, data, and no torch import."""

import json
import subprocess
import sys

from conftest import requires_smollm2, write_jsonl

from edgetune.cli import main, parser


def test_help_says_which_base_sizes_use():
    text = parser("plan").format_help() + parser("plan")._subparsers._group_actions[0].choices[
        "plan"].format_help()
    assert "8 x 2**30 bytes" in text and "--vram" in text and "--target" in text


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_prints_every_term(capsys):
    code, out, _ = run(capsys, "--ram", "4gb", "--model", "qwen2.5-0.5b", "--seq-len", "256",
                       "--dtype", "bf16")
    assert code == 0
    for term in ("runtime", "base weights", "embeddings+norms", "adapter grads", "optimizer",
                 "activations", "loss", "dequant", "margin", "VmHWM", "next best", "train with"):
        assert term in out


def test_plan_json(capsys):
    code, out, _ = run(capsys, "--ram", "3gb", "--model", "qwen2.5-0.5b", "--json", "--dtype", "bf16")
    data = json.loads(out)
    assert code == 0 and data["budget_bytes"] == 3 * 2**30
    plan = data["plan"]
    assert plan["memory"]["total"] <= 3 * 2**30
    assert set(plan) >= {"quant", "rank", "batch_size", "grad_accum", "grad_checkpointing", "optim"}
    assert data["alternatives"]


def test_catalogue_table(capsys):
    code, out, _ = run(capsys, "--ram", "6gb", "--dtype", "bf16")
    assert code == 0
    for name in ("smollm2-135m", "qwen2.5-7b", "llama-3.2-1b", "gemma-2-2b", "mistral-7b"):
        assert name in out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert " yes " in rows["smollm2-135m"] and " no " in rows["llama-3.1-8b"]


def test_too_small_is_one_line_and_nonzero(capsys):
    code, out, err = run(capsys, "--ram", "2gb", "--model", "qwen2.5-7b", "--dtype", "bf16")
    assert code == 1 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("edgetune: --ram 2.00gb is too small: qwen2.5-7b needs --ram ")
    assert "nf4, rank 4, batch 1" in err and "Traceback" not in err


def test_bad_model_budget_and_seq_len_are_one_line_each(capsys, tiny_model, tmp_path):
    """Each names the value and what would work."""
    (tmp_path / "empty").mkdir()
    cases = {("--ram", "8gb", "--model", str(tmp_path / "empty")): "has no config.json",
             ("--ram", "100mb", "--model", str(tiny_model)): "--ram 100mb is less than the trainer's "
                                                            "runtime alone",
             ("--ram", "8gb", "--model", str(tiny_model), "--seq-len", "300"):
                 "--seq-len 300 is longer than llama holds (max_position_embeddings 256): use "
                 "--seq-len 256 or less"}
    for args, expected in cases.items():
        code, out, err = run(capsys, *args)
        assert code == 1 and out == "" and err.count("\n") == 1 and expected in err
    assert "needs --ram " in run(capsys, "--ram", "100mb", "--model", str(tiny_model))[2]
    # Without --seq-len the default (512) is cut to what the model holds.
    code, out, _ = run(capsys, "--ram", "8gb", "--model", str(tiny_model), "--json")
    assert code == 0 and json.loads(out)["plan"]["seq_len"] == 256


def test_bad_inputs_are_user_errors(capsys):
    assert run(capsys, "--model", "qwen2.5-0.5b")[0] == 1
    assert run(capsys, "--vram", "6gb", "--model", "qwen2.5-0.5b")[0] == 1  # needs --device cuda
    assert run(capsys, "--ram", "lots", "--model", "qwen2.5-0.5b")[0] == 1
    assert "not in the catalogue" not in run(capsys, "--ram", "8gb", "--model", "nope")[2]
    assert run(capsys, "--ram", "8gb", "--model", "nope")[0] == 1


def test_vram_plan_for_cuda(capsys):
    code, out, _ = run(capsys, "--vram", "6gb", "--device", "cuda", "--model", "qwen2.5-1.5b")
    assert code == 0 and "--vram 6.00 GiB" in out and "cuda in bf16" in out


def test_local_folder_and_data_choose_seq_len(capsys, tiny_model, tmp_path):
    records = [{"text": " ".join(["fox"] * (1 + i % 5))} for i in range(40)]
    data = write_jsonl(tmp_path / "d.jsonl", records)
    code, out, _ = run(capsys, "--ram", "2gb", "--model", str(tiny_model), "--data", str(data),
                       "--json")
    result = json.loads(out)
    assert code == 0 and result["plan"]["seq_len"] == 64  # every record is well under 64 tokens
    assert result["data"]["examples"] == 40 and result["data"]["exact_tokens"]
    assert result["data"]["steps"] == 10  # 40 examples / effective batch 4, train's default
    assert result["data"]["eta_s"] >= 0


def test_calibration_is_cached(tmp_path, monkeypatch):
    from edgetune.plan import timing

    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path))
    assert timing.cached_gflops() is None
    measured = timing.calibrate()
    assert measured["fp32"] > 0 and timing.cached_gflops() == measured


def test_plan_never_imports_torch(tiny_model):
    code = ("import sys; from edgetune.cli import main; "
            f"main(['plan', '--ram', '8gb', '--model', {str(tiny_model)!r}]); "
            "main(['plan', '--ram', '8gb']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@requires_smollm2
def test_real_gguf_header(capsys):
    from edgetune.models import builtin_gguf

    code, out, _ = run(capsys, "--ram", "4gb", "--model", str(builtin_gguf("smollm2-135m")), "--json")
    assert code == 0 and json.loads(out)["params"] == 134_515_008


def test_target_device_fit(capsys):
    code, out, _ = run(capsys, "--ram", "4gb", "--model", "qwen2.5-0.5b", "--target", "rpi5-8gb",
                       "--json")
    target = json.loads(out)["target"]
    assert code == 0 and target["device"] == "rpi5-8gb" and target["fits"] is True


def test_plan_nproc_shares_the_budget_and_counts_the_all_reduce(capsys):
    from edgetune.plan.catalogue import catalogue_shape
    from edgetune.plan.timing import GLOO_BYTES_PER_S

    common = ("--ram", "8gb", "--model", "smollm2-135m", "--dtype", "fp32", "--seq-len", "256",
              "--batch", "16", "--json")
    one = json.loads(run(capsys, *common)[1])
    code, out, _ = run(capsys, *common, "--nproc", "2")
    two = json.loads(out)
    assert code == 0 and two["nproc"] == 2 and two["budget_per_process_bytes"] == 4 * 2**30
    plan = two["plan"]
    assert plan["memory"]["total"] <= 4 * 2**30
    assert plan["batch_size"] * plan["grad_accum"] == 8  # per process: 2 x 8 is the global 16
    gradients = 4 * catalogue_shape("smollm2-135m").lora_params(plan["rank"])
    assert two["allreduce_s_per_step"] == round(gradients / GLOO_BYTES_PER_S, 4)  # 2 ranks: 1x
    assert one["allreduce_s_per_step"] == 0 and one["budget_per_process_bytes"] == 8 * 2**30
    text = run(capsys, *common[:-1], "--nproc", "2")[1]
    assert "2 processes: memory above is per process" in text and text.count("--nproc 2") == 1
    assert run(capsys, *common, "--nproc", "0")[2].strip() == (
        "edgetune: --nproc must be at least 1, got 0")
