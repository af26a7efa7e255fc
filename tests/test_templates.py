"""Chat templates: the named ones, --template FILE, the default for a base model, and a run's
template travelling into the GGUF and the Modelfile."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from edgetune import templates
from edgetune.errors import EdgetuneError
from edgetune.runfiles import CHAT_TEMPLATE

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


@pytest.mark.parametrize("name", sorted(templates.TEMPLATES))
def test_named_templates_render_prefix_turns(name):
    text = templates.TEMPLATES[name].jinja
    templates.check(text, name)  # the prompt is a prefix of the conversation with the answer
    assert templates.resolve(name) == (name, text)
    assert templates.known(text).name == name


def test_named_templates_render_as_their_formats():
    render = lambda name: templates.render(templates.TEMPLATES[name].jinja, CONVERSATION,  # noqa: E731
                                           True, "<bos>", "<eos>")
    assert render("gemma") == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                               "<start_of_turn>model\nHello.<end_of_turn>\n"
                               "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert render("chatml") == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                                "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                                "<|im_start|>assistant\n")
    assert render("llama3").startswith("<bos><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert render("plain") == ("Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello.<eos>\n\n"
                               "### Instruction:\nBye\n\n### Response:\n")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(EdgetuneError, match="--template vicuna: unknown template; known: chatml, gemma, "
                                            "llama3, plain, or a .jinja file"):
        templates.resolve("vicuna")
    with pytest.raises(EdgetuneError, match="missing.jinja: file does not exist"):
        templates.resolve("missing.jinja")


def test_template_file_must_render_a_user_and_an_assistant_turn(tmp_path):
    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                    "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert templates.resolve(str(good)) == (str(good), good.read_text())
    users_only = tmp_path / "users.jinja"
    users_only.write_text("{% for m in messages if m['role'] == 'user' %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(EdgetuneError, match="users.jinja does not render an assistant turn"):
        templates.resolve(str(users_only))
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(EdgetuneError, match="broken.jinja: cannot render the chat template"):
        templates.resolve(str(broken))


def test_base_model_default_follows_the_vocabulary():
    assert templates.default_for({"<start_of_turn>": 1, "<end_of_turn>": 2, "<|im_start|>": 3}) == "gemma"
    assert templates.default_for({"<|im_start|>", "<|im_end|>"}) == "chatml"
    assert templates.default_for({"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}) == "llama3"
    assert templates.default_for({"<s>", "</s>"}) == "plain"
    assert templates.missing_markers(templates.CHATML, {"<|im_start|>"}) == ["<|im_end|>"]


def test_unknown_template_on_the_command_line_leaves_no_run(tiny_model, alpaca_file, tmp_path):
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "edgetune", "train", "--model", str(tiny_model),
                             "--data", str(alpaca_file), "--template", "vicuna", "--output", str(run)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "edgetune: --template vicuna: unknown template; known: chatml, gemma, llama3, plain, "
        "or a .jinja file"]
    assert not run.exists()


@pytest.fixture(scope="module")
def base_model(tiny_model, tmp_path_factory):
    """The tiny model as a base model: its tokenizer has no chat template."""
    folder = shutil.copytree(tiny_model, tmp_path_factory.mktemp("base") / "model")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    return folder


def test_base_model_run_records_its_default_and_export_writes_it(base_model, alpaca_file, tmp_path,
                                                                 capsys):
    from gguf import GGUFReader

    from edgetune import cli

    run, out = tmp_path / "run", tmp_path / "export"
    assert cli.main(["train", "--model", str(base_model), "--data", str(alpaca_file), "--steps", "2",
                     "--batch-size", "4", "--seq-len", "64", "--output", str(run), "--no-progress",
                     "--dtype", "fp32", "--threads", "1", "--save-every", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"{base_model} has no chat template (a base model): using 'chatml'" in printed
    assert yaml.safe_load((run / "edgetune_run.yaml").read_text())["template"] == "chatml"
    assert (run / CHAT_TEMPLATE).read_text() == templates.CHATML
    assert cli.main(["export", str(run), "--gguf", "f16", "--output", str(out), "--positions", "32"]) == 0
    reader = GGUFReader(out / "model-f16.gguf")
    assert reader.get_field("tokenizer.chat_template").contents() == templates.CHATML
    modelfile = (out / "model-f16.Modelfile").read_text()
    assert f'TEMPLATE """{templates.GO_CHATML}"""' in modelfile


def test_instruct_model_keeps_its_template_unless_told(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from edgetune.train.command import _chat_template
    from edgetune.train.config import TrainConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    own = tokenizer.chat_template
    records = {"d.jsonl": ("alpaca", [])}
    config = TrainConfig(model=str(tiny_model), data="d.jsonl")
    assert _chat_template(config, tokenizer, records, tmp_path) == (config, None)
    assert tokenizer.chat_template == own
    told = TrainConfig(model=str(tiny_model), data="d.jsonl", template="plain")
    assert _chat_template(told, tokenizer, records, tmp_path) == (told, templates.PLAIN)
    assert tokenizer.chat_template == templates.PLAIN


def test_plain_template_trains_with_eos(tiny_model):
    """The response ends with eos, so the model learns to stop; the prompt carries no loss."""
    from transformers import AutoTokenizer

    from edgetune.train.data import encode

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = templates.PLAIN
    (example,) = encode(tokenizer, "alpaca", [{"instruction": "Say hi", "output": "hi"}])
    text = tokenizer.decode(example.input_ids)
    assert text == "### Instruction:\nSay hi\n\n### Response:\nhi<|im_end|>\n\n"
    learned = [t for t, label in zip(example.input_ids, example.labels) if label != -100]
    assert tokenizer.decode(learned) == "hi<|im_end|>\n\n"
