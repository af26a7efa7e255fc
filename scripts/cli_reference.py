"""Regenerate the README's CLI reference from the real `--help` output, so the docs cannot drift.

    python scripts/cli_reference.py          # rewrite README.md in place
    python scripts/cli_reference.py --check  # exit 1 if README.md is out of date
"""

import os
import sys
from pathlib import Path

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"
README = Path(__file__).resolve().parents[1] / "README.md"


def reference() -> str:
    """Markdown with each verb's help text, formatted at a fixed width."""
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width; fix it for the docs
    from edgetune.cli import VERBS, parser

    parts = ["```text\n$ edgetune --help\n" + parser().format_help().rstrip() + "\n```"]
    for verb in VERBS:
        sub = parser(verb)._subparsers._group_actions[0].choices[verb]
        parts.append(f"### `edgetune {verb}`\n\n```text\n{sub.format_help().rstrip()}\n```")
    return "\n\n".join(parts)


def updated(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{reference()}\n{END}{tail}"


def main() -> int:
    text = README.read_text()
    new = updated(text)
    if "--check" in sys.argv:
        if new != text:
            print("README.md's CLI reference is out of date: run python scripts/cli_reference.py")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
