"""The quick-start task: rewrite a date written in words or numbers as ISO 8601 (YYYY-MM-DD).

SmolLM2-135M-Instruct answers this with prose or a wrong date; a few minutes of LoRA teach it the
format and the month table. Train and held-out sets use disjoint dates, so held-out exact match
measures the skill, not memory.
"""

import datetime
import json
import random
from pathlib import Path

INSTRUCTION = "Convert the date to ISO 8601 format (YYYY-MM-DD). Reply with the date only."
STYLES = (
    lambda d: f"{d:%B} {d.day}, {d.year}",  # March 5, 2024
    lambda d: f"{d.day} {d:%B} {d.year}",  # 5 March 2024
    lambda d: f"{d:%b} {d.day} {d.year}",  # Mar 5 2024
    lambda d: f"{d:%A}, {d:%B} {d.day}, {d.year}",  # Tuesday, March 5, 2024
    lambda d: f"the {_ordinal(d.day)} of {d:%B}, {d.year}",  # the 5th of March, 2024
)


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def record(date: datetime.date, style: int) -> dict:
    return {"instruction": INSTRUCTION, "input": STYLES[style](date), "output": date.isoformat()}


def generate(n_train: int = 600, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out records over disjoint dates between 1950 and 2049."""
    rng = random.Random(seed)
    start = datetime.date(1950, 1, 1)
    days = rng.sample(range((datetime.date(2049, 12, 31) - start).days), n_train + n_eval)
    dates = [start + datetime.timedelta(days=d) for d in days]
    records = [record(d, rng.randrange(len(STYLES))) for d in dates]
    return records[:n_train], records[n_train:]


def write(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in zip(("train.jsonl", "eval.jsonl"), generate(seed=seed)):
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(path)
    return paths[0], paths[1]


if __name__ == "__main__":
    for p in write(Path(__file__).resolve().parents[2] / "examples" / "dates"):
        print(p)
