"""Held-out token ids for verification: the run's eval data, topped up from built-in texts.

Eval splits are often a few records, far fewer tokens than the positions verification compares, so
the built-in texts fill the rest. They are of different kinds (prose, narrative, dialogue, code,
numbers and dates) because a file's errors show differently on each: a small model is confident on
code and dates and unsure on fiction, where many next tokens are near-ties.
"""

from pathlib import Path

from edgetune.errors import EdgetuneError

PROSE = """\
Water moves through the environment in a continuous cycle. The heat of the sun causes water in \
oceans, lakes and rivers to evaporate and rise into the atmosphere as water vapor. As the vapor \
rises, it cools and condenses into tiny droplets that form clouds. When the droplets grow large \
enough, they fall back to the ground as rain or snow. This process is called precipitation. Some of \
the water flows over the surface of the land into streams and rivers, which carry it back to the \
ocean. Some of it soaks into the soil and becomes groundwater, which can stay underground for \
thousands of years. Plants also play an important role in the water cycle. They take up water \
through their roots and release it into the air through small openings in their leaves, a process \
known as transpiration.
The water cycle is important for life on Earth because it provides fresh water for people, animals \
and plants. It also helps to regulate the temperature of the planet by moving heat from one place to \
another. Scientists study the water cycle to understand how changes in the climate may affect the \
amount of rain that falls in different regions. For example, warmer temperatures can increase \
evaporation, which may lead to more intense storms in some areas and longer droughts in others. By \
learning how water moves through the environment, communities can plan better ways to store and \
protect their water supply for the future. Simple steps such as fixing leaks, collecting rain water \
and planting trees near rivers all help to keep the cycle healthy.
"""

NARRATIVE = """\
The lighthouse keeper had not seen a ship in eleven days when the girl rowed in out of the fog. \
She was perhaps twelve, soaked to the skin, and she held the oars as if she had been born with them. \
Martin watched her from the gallery at the top of the tower, then went down the spiral stairs two at \
a time and out onto the rocks. "You'll want to come inside," he called over the wind. She looked at \
him for a long moment, tied the boat to the iron ring without a word, and followed him up. \
In the kitchen he set a kettle on the stove and found her a blanket that smelled of salt and \
paraffin. She told him her name was Ada and that her father fished out of the harbour on the far \
side of the bay. The storm had torn the mooring loose in the night, she said, and she had tried to \
bring the boat back alone. Martin said nothing about how far she had come. He poured the tea, pushed \
the sugar towards her, and asked whether she had ever seen the lamp up close. Her eyes went to the \
ceiling, where the great lens turned slowly above them, throwing its beam across the dark water. \
That night they climbed to the lantern room together, and he showed her how to trim the wick, how to \
wind the clockwork that turned the lens, and how to write the weather in the log: wind south-west, \
sea rough, visibility poor. When the fog lifted at dawn, a fishing boat was already crossing the bay \
towards them, and a man stood in the bow, waving with both arms.
"""

DIALOGUE = """\
Customer: Hi, I ordered a pair of hiking boots last week and they arrived yesterday, but they are \
too small. Can I exchange them for a larger size?
Agent: I'm sorry to hear that! Yes, you can exchange them. Could you tell me your order number?
Customer: Sure, it's 48213.
Agent: Thank you. I can see the order: the Trail Runner boots in size 41. Which size would you like \
instead?
Customer: I think 42 would be right. My toes touch the front when I walk downhill.
Agent: That makes sense; many people go up half a size for hiking. Size 42 is in stock. I'll send \
you a prepaid return label by email. Once you drop off the old pair, we'll ship the new one.
Customer: Do I have to wait until you receive the old pair?
Agent: No, we ship the replacement as soon as the carrier scans your package, usually the same day.
Customer: Great. How long does delivery take?
Agent: Standard delivery takes three to five working days. Would you like express delivery? It's \
free for exchanges.
Customer: Yes, please, I have a trip planned for the weekend.
Agent: Done. Your new boots should arrive by Thursday. Is there anything else I can help you with?
Customer: Can I wear them in the rain? The description didn't say if they are waterproof.
Agent: They have a waterproof membrane, so light rain and shallow streams are fine. I'd still \
recommend a waterproofing spray once a season to keep the leather in good shape.
Customer: Perfect, thank you so much for your help.
Agent: You're welcome! Enjoy your trip, and happy hiking.
"""

CODE = '''\
import json
from pathlib import Path


def load_scores(path):
    """Read one JSON record per line and return a dict of name -> list of scores."""
    scores = {}
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_number}: {exc}") from None
            scores.setdefault(record["name"], []).append(float(record["score"]))
    return scores


def summary(scores):
    """Mean, minimum and maximum score of each name, sorted by mean, best first."""
    rows = []
    for name, values in scores.items():
        mean = sum(values) / len(values)
        rows.append((name, mean, min(values), max(values)))
    rows.sort(key=lambda row: row[1], reverse=True)
    return rows


def main():
    scores = load_scores(Path("scores.jsonl"))
    for name, mean, low, high in summary(scores):
        print(f"{name:<12} {mean:6.2f} {low:6.2f} {high:6.2f}")


if __name__ == "__main__":
    main()
'''

NUMBERS = """\
Quarterly report, prepared on 2024-04-02.
Q1 2024 revenue: $1,284,500 (up 12.4% from $1,142,800 in Q1 2023).
Operating costs: $903,250; gross margin 29.7%.
January: 412 orders, average value $1,002.18, returns 3.1%.
February: 398 orders, average value $987.40, returns 2.8%.
March: 455 orders, average value $1,041.95, returns 3.4%.
Headcount on 31 March 2024: 27 (hired 4, left 1).
Key dates for the next quarter:
- 15 April 2024: tax filing deadline.
- 3 May 2024 at 10:30: board meeting, room 4B.
- 21 May 2024: product launch, expected 1,500 pre-orders.
- 12 June 2024: supplier contract renewal (current rate $18.75 per unit, proposed $17.90).
- 28 June 2024: end of quarter; inventory count starts at 08:00.
Exchange rates used: 1 EUR = 1.0832 USD, 1 GBP = 1.2641 USD, 100 JPY = 0.6612 USD.
Loan balance: $250,000 at 5.25% annual interest, monthly payment $2,683.16, final payment due \
on 1 January 2034.
Website: 18,342 visits in March (mobile 61%, desktop 39%), conversion rate 2.48%.
Warehouse temperature log, 1 April 2024: 06:00 14.2 C, 09:00 15.8 C, 12:00 18.1 C, 15:00 19.4 C, \
18:00 17.6 C, 21:00 15.9 C.
"""

TEXTS = {"prose": PROSE, "narrative": NARRATIVE, "dialogue": DIALOGUE, "code": CODE,
         "numbers": NUMBERS}


def text_ids(tokenizer, kind: str) -> list[int]:
    """Token ids of one built-in text, closed by eos so the next text starts afresh."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return tokenizer(TEXTS[kind], add_special_tokens=False)["input_ids"] + eos


def builtin_mix(tokenizer, n_tokens: int) -> tuple[list[int], list[str]]:
    """(ids, kinds): `n_tokens` ids taken evenly from the start of every built-in text.

    Fewer than `n_tokens` when the texts together are shorter.
    """
    texts = sorted(((k, text_ids(tokenizer, k)) for k in TEXTS), key=lambda kv: len(kv[1]))
    shares: dict[str, list[int]] = {}
    left = n_tokens
    for i, (kind, ids) in enumerate(texts):
        share = min(len(ids), -(-left // (len(texts) - i)))  # the rest, split evenly, rounded up
        shares[kind], left = ids[:share], left - share
    kinds = [k for k in TEXTS if shares[k]]
    return [t for k in kinds for t in shares[k]], kinds


def run_examples(run_config: dict, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(training, held-out) token ids per example of a run, split as `edgetune train` split them:
    its --eval-data, else the seeded --eval-split of its --data. Missing files give empty lists."""
    from edgetune.records import read_jsonl
    from edgetune.train.data import encode, fit_to_length, split

    seq_len = int(run_config.get("seq_len") or 2048)

    def examples(path: str) -> list[list[int]]:
        fmt, rows = read_jsonl(path)
        return [e.input_ids for e in fit_to_length(encode(tokenizer, fmt, rows), seq_len, path)]

    data, eval_data = run_config.get("data"), run_config.get("eval_data")
    for role, path in (("training", data), ("eval", eval_data)):
        if path and not Path(path).is_file():
            print(f"edgetune: the run's {role} data {path} is not there any more; going without it")
    train = examples(data) if data and Path(data).is_file() else []
    if eval_data:
        return train, examples(eval_data) if Path(eval_data).is_file() else []
    return split(train, float(run_config.get("eval_split") or 0), int(run_config.get("seed") or 0))


def held_out_ids(tokenizer, eval_examples: list[list[int]], positions: int) -> list[int]:
    """positions + 1 token ids: the run's held-out examples, topped up with built-in texts when short."""
    needed = positions + 1
    ids = [t for example in eval_examples for t in example][:needed]
    if len(ids) < needed:
        extra, kinds = builtin_mix(tokenizer, needed - len(ids))
        if len(ids) + len(extra) < needed:
            have = f"the eval data's {len(ids)} tokens and " if ids else ""
            raise EdgetuneError(f"--positions {positions} needs {needed} held-out tokens but "
                                f"{have}the built-in texts' {len(extra)} are all there are; "
                                f"use --positions {len(ids) + len(extra) - 1} or less")
        if ids:
            print(f"edgetune: the eval data has {len(ids)} tokens, fewer than --positions "
                  f"{positions} needs: adding {len(extra)} tokens of built-in text "
                  f"({', '.join(kinds)})")
        ids += extra
    return ids
