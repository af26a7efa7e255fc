"""Regenerate docs/cli.md from the real `--help` output, so the reference cannot drift.

    python scripts/cli_reference.py          # rewrite docs/cli.md
    python scripts/cli_reference.py --check  # exit 1 if docs/cli.md is out of date
"""

import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
HEADER = """# CLI reference

Generated from the real `--help` by `python scripts/cli_reference.py`; do not edit by hand.

"""


def reference() -> str:
    """Markdown with each verb's help text, formatted at a fixed width."""
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width; fix it for the docs
    from edgetune.cli import VERBS, parser

    parts = ["```text\n$ edgetune --help\n" + parser().format_help().rstrip() + "\n```"]
    for verb in VERBS:
        sub = parser(verb)._subparsers._group_actions[0].choices[verb]
        parts.append(f"### `edgetune {verb}`\n\n```text\n{sub.format_help().rstrip()}\n```")
    return "\n\n".join(parts)


def main() -> int:
    new = HEADER + reference() + "\n"
    if "--check" in sys.argv:
        if not DOC.is_file() or DOC.read_text() != new:
            print("docs/cli.md is out of date: run python scripts/cli_reference.py")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
