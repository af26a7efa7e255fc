import json

import pytest
from conftest import write_jsonl
from transformers import AutoTokenizer

from edgetune.constants import IGNORE
from edgetune.errors import EdgetuneError
from edgetune.records import read_jsonl
from edgetune.train.data import Batches, encode, fit_to_length, split


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("record, fmt", [
    ({"instruction": "a", "input": "b", "output": "c"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "chat"),
    ({"text": "hello"}, "text"),
])
def test_format_is_detected(tmp_path, record, fmt):
    assert read_jsonl(write_jsonl(tmp_path / "d.jsonl", [record, record]))[0] == fmt


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a"}', '{"text": '], "d.jsonl:2: not valid JSON"),
    (['{"text": "a"}', '{"instruction": "x", "output": "y"}'], "d.jsonl:2: text record needs"),
    (['[1, 2]'], "d.jsonl:1: expected a JSON object"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "d.jsonl:1: chat record has no assistant"),
    (['{"prompt": "x"}'], "d.jsonl:1: cannot tell the format"),
    (['', '  '], "has no records"),
])
def test_malformed_lines_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EdgetuneError, match=message):
        read_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(EdgetuneError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_alpaca_loss_covers_only_the_response(tokenizer):
    record = {"instruction": "What is the capital of France?", "output": "Paris"}
    (example,) = encode(tokenizer, "alpaca", [record])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": record["instruction"]}],
                                           add_generation_prompt=True, tokenize=False)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example.labels[:n_prompt] == [IGNORE] * n_prompt
    learned = example.labels[n_prompt:]
    assert learned == example.input_ids[n_prompt:]
    assert tokenizer.decode(learned).startswith("Paris<|im_end|>")


def test_chat_masks_every_non_assistant_turn(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Capital?"},
                {"role": "assistant", "content": "Paris"}]
    (example,) = encode(tokenizer, "chat", [{"messages": messages}])
    learned = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert "Hello<|im_end|>" in learned and "Paris<|im_end|>" in learned
    assert "Capital" not in learned and "Be brief" not in learned


def test_text_records_learn_every_token_and_end_with_eos(tokenizer):
    (example,) = encode(tokenizer, "text", [{"text": "The quick brown fox"}])
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_seq_len_shorter_than_every_example(tokenizer):
    examples = encode(tokenizer, "alpaca", [{"instruction": "What is the capital of France?",
                                              "output": "Paris"}])
    with pytest.raises(EdgetuneError, match="--seq-len 4 is shorter than every example"):
        fit_to_length(examples, 4, "d.jsonl")
    assert len(fit_to_length(examples, 64, "d.jsonl")) == 1


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    train, held = split(items, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == items
    assert split(items, 0.1, seed=3) == (train, held)
    assert split(items, 0.1, seed=4)[1] != held


def test_batches_resume_from_their_state(tokenizer):
    examples = encode(tokenizer, "text", [{"text": f"number {i}"} for i in range(10)])
    a = Batches(examples, 3, seed=1, pad_id=0)
    seen = [a.next()["input_ids"].tolist() for _ in range(5)]  # crosses an epoch boundary
    b = Batches(examples, 3, seed=1, pad_id=0)
    for _ in range(2):
        b.next()
    c = Batches(examples, 3, seed=1, pad_id=0)
    c.load_state(b.state())
    assert [c.next()["input_ids"].tolist() for _ in range(3)] == seen[2:]


def test_dates_example_matches_the_generator(tmp_path):
    from pathlib import Path

    from edgetune.examples import dates

    train, held = dates.write(tmp_path)
    shipped = Path(__file__).parents[1] / "examples" / "dates"
    assert train.read_text() == (shipped / "train.jsonl").read_text()
    assert held.read_text() == (shipped / "eval.jsonl").read_text()
    train_dates = {json.loads(line)["output"] for line in train.read_text().splitlines()}
    held_dates = {json.loads(line)["output"] for line in held.read_text().splitlines()}
    assert not train_dates & held_dates
