"""A second built-in task, of another kind than dates: pull two fields out of a sentence.

"Extract the person's name and the city. Reply as: name; city." over one-line notes such as "Spoke
with Amara Okafor yesterday; she moved to Valencia in 2019." The answer is "Amara Okafor; Valencia".
Names and cities of the held-out set never appear in training, so exact match measures the skill
(find the fields, keep their spelling, use the format), not memory.
"""

import json
import random
from pathlib import Path

INSTRUCTION = "Extract the person's full name and the city. Reply as: name; city"
FIRST = ("Amara", "Bruno", "Chen", "Dalia", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jonas",
         "Kira", "Luca", "Maya", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Umar",
         "Vera", "Wen", "Xavier", "Yara", "Zoe", "Anton", "Bea", "Carlos", "Dina", "Elif", "Felix",
         "Greta", "Hugo", "Ines", "Jamal", "Karin", "Leo", "Mira", "Noah")
LAST = ("Okafor", "Silva", "Novak", "Haddad", "Lindqvist", "Moreau", "Petrov", "Tanaka", "Kowalski",
        "Rossi", "Mensah", "Fischer", "Duarte", "Nakamura", "Oyelaran", "Berg", "Castillo", "Dubois",
        "Eriksen", "Ferrari", "Gupta", "Horvat", "Ivanova", "Jensen", "Kaur", "Laine", "Mbeki",
        "Nguyen", "Ortiz", "Papadopoulos", "Quispe", "Romero", "Schmidt", "Toure", "Urbano", "Varga",
        "Weber", "Yilmaz", "Zapata", "Abe")
CITIES = ("Valencia", "Porto", "Gdansk", "Tampere", "Lyon", "Kraków", "Osaka", "Accra", "Bergen",
          "Medellín", "Izmir", "Salzburg", "Bologna", "Cork", "Brno", "Leipzig", "Hanoi", "Cusco",
          "Dakar", "Aarhus", "Seville", "Graz", "Utrecht", "Tbilisi", "Nantes", "Turku", "Pune",
          "Lagos", "Malmö", "Rosario", "Gent", "Split", "Kyoto", "Quito", "Riga", "Tallinn",
          "Bilbao", "Lille", "Mombasa", "Perth")
TEMPLATES = (
    "Spoke with {name} yesterday; {they} moved to {city} in {year}.",
    "{name} will present the quarterly results in {city} on {day} {month}.",
    "Package for {name}, {number} Harbour Street, {city}. Fragile.",
    "Met {name} at the {city} conference, booth {number}.",
    "Reminder: call {name} about the flat in {city} before {day} {month}.",
    "In {year}, {name} opened a small bakery in {city}.",
    "{city} office: {name} is the new contact for invoices over {number} euros.",
    "Flight {number} to {city} is booked for {name}.",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")


def _split(pool: tuple[str, ...], rng: random.Random) -> tuple[list[str], list[str]]:
    """A seeded 80/20 split of `pool` into training and held-out values."""
    order = list(pool)
    rng.shuffle(order)
    cut = len(order) * 4 // 5
    return order[:cut], order[cut:]


def record(name: str, city: str, rng: random.Random) -> dict:
    text = rng.choice(TEMPLATES).format(
        name=name, city=city, they=rng.choice(("she", "he", "they")), year=rng.randrange(1990, 2030),
        day=rng.randrange(1, 29), month=rng.choice(MONTHS), number=rng.randrange(2, 999))
    return {"instruction": INSTRUCTION, "input": text, "output": f"{name}; {city}"}


def generate(n_train: int = 600, n_eval: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out records whose first names, last names and cities do not overlap."""
    rng = random.Random(seed)
    pools = [_split(pool, rng) for pool in (FIRST, LAST, CITIES)]

    def records(n: int, side: int) -> list[dict]:
        first, last, cities = (pool[side] for pool in pools)
        return [record(f"{rng.choice(first)} {rng.choice(last)}", rng.choice(cities), rng)
                for _ in range(n)]

    return records(n_train, 0), records(n_eval, 1)


def write(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and eval.jsonl into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in zip(("train.jsonl", "eval.jsonl"), generate(seed=seed)):
        path = folder / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                        encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]
