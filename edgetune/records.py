"""JSONL training data as records: alpaca, chat messages or plain text, read and checked without torch.

The format is detected per file from its first record and every record must match it. A bad line
(invalid JSON or UTF-8, a missing field, a binary file) is an error naming `file:line`.
"""

import json
from pathlib import Path

from edgetune.errors import EdgetuneError


def read_jsonl(path: str | Path, prompts: bool = False) -> tuple[str, list[dict]]:
    """The detected format and the records of a JSONL file; a bad line raises with `file:line`.

    With `prompts`, records may come without an answer (an alpaca record with no output, a chat
    ending in a user turn): a teacher writes those (`edgetune distill`).
    """
    file = Path(path)
    if file.is_dir():
        raise EdgetuneError(f"data file {path} is a folder; pass a .jsonl file")
    if not file.is_file():
        raise EdgetuneError(f"data file {path} does not exist")
    records, fmt = [], None
    try:
        with file.open("rb") as stream:
            for lineno, raw in enumerate(stream, 1):
                record = _parse(raw, f"{path}:{lineno}")
                if record is None:
                    continue
                fmt = fmt or _detect(record, f"{path}:{lineno}")
                _check(record, fmt, f"{path}:{lineno}", prompts)
                records.append(record)
    except OSError as exc:
        raise EdgetuneError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    if not records:
        raise EdgetuneError(f"data file {path} has no records")
    return fmt, records


def _parse(raw: bytes, where: str) -> dict | None:
    """One JSONL line as a dict, None for a blank line; binary or non-UTF-8 bytes are refused."""
    if b"\0" in raw:
        raise EdgetuneError(f"{where}: a NUL byte: this is a binary file, not JSONL text")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgetuneError(f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                            f"{exc.start + 1}); save the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EdgetuneError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise EdgetuneError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _detect(record: dict, where: str) -> str:
    if "messages" in record:
        return "chat"
    if "instruction" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    raise EdgetuneError(f"{where}: cannot tell the format: expected a 'messages' (chat), "
                        f"'instruction' and 'output' (alpaca) or 'text' field, got {sorted(record)}")


def _check(record: dict, fmt: str, where: str, prompts: bool = False) -> None:
    def need_str(key: str, optional: bool = False) -> None:
        if optional and key not in record:
            return
        if not isinstance(record.get(key), str):
            raise EdgetuneError(f"{where}: {fmt} record needs a string '{key}' field")

    if fmt == "text":
        need_str("text")
    elif fmt == "alpaca":
        need_str("instruction"), need_str("output", prompts), need_str("input", optional=True)
    else:
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise EdgetuneError(f"{where}: chat record needs a non-empty 'messages' list")
        for i, msg in enumerate(messages):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)
                    and isinstance(msg.get("content"), str)):
                raise EdgetuneError(f"{where}: messages[{i}] needs string 'role' and 'content'")
        asks = prompts and messages[-1]["role"] == "user"
        if not asks and not any(m["role"] == "assistant" for m in messages):
            raise EdgetuneError(f"{where}: chat record has no assistant message to learn from"
                                + (" and does not end in a user turn" if prompts else ""))


def to_messages(record: dict, fmt: str) -> list[dict]:
    """A chat or alpaca record as a list of chat messages."""
    if fmt == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    prompt = record["instruction"]
    if record.get("input"):
        prompt += "\n\n" + record["input"]
    messages = [{"role": "user", "content": prompt}]
    if "output" in record:  # a prompt without its answer has none (edgetune distill)
        messages.append({"role": "assistant", "content": record["output"]})
    return messages


def prompt_messages(record: dict, fmt: str) -> list[dict]:
    """The messages before the last assistant turn (all of a prompt without an answer): what a model
    is asked at evaluation time."""
    messages = to_messages(record, fmt)
    if not answered(record, fmt):
        return messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def answered(record: dict, fmt: str) -> bool:
    """Whether a record carries its answer (text records always do)."""
    if fmt == "alpaca":
        return "output" in record
    if fmt == "chat":
        return record["messages"][-1]["role"] == "assistant"
    return True


def with_answer(record: dict, fmt: str, answer: str) -> dict:
    """The record of a prompt with `answer` added as its response, in the record's own format."""
    if fmt == "alpaca":
        return {**record, "output": answer}
    return {**record, "messages": [*record["messages"], {"role": "assistant", "content": answer}]}
