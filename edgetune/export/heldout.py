"""Held-out text for verification: token ids that every exported file and the torch model both see."""

from pathlib import Path

from edgetune.errors import EdgetuneError

# Held-out text when the run has no eval data: educational prose like the web text small models are
# trained on, over 256 tokens in any common tokenizer.
HELD_OUT_TEXT = """\
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


def held_out_ids(tokenizer, eval_data: str | None, positions: int) -> list[int]:
    """positions + 1 token ids: the run's eval data where it has enough, then the built-in text."""
    ids: list[int] = []
    if eval_data and Path(eval_data).is_file():
        from edgetune.records import read_jsonl
        from edgetune.train.data import encode

        fmt, records = read_jsonl(eval_data)
        for example in encode(tokenizer, fmt, records):
            ids += example.input_ids
            if len(ids) > positions:
                break
    elif eval_data:
        print(f"edgetune: eval data {eval_data} not found; verifying on the built-in English text")
    if len(ids) <= positions:
        ids += tokenizer(HELD_OUT_TEXT, add_special_tokens=False)["input_ids"]
    check_positions(len(ids), positions)
    return ids[: positions + 1]


def check_positions(n_ids: int, positions: int) -> None:
    if n_ids < positions + 1:
        raise EdgetuneError(f"held-out text has {n_ids} tokens but --positions {positions} needs "
                            f"{positions + 1}; lower --positions or give longer eval data")
