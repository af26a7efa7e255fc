"""The built-in tasks: seeded, well-formed, and with held-out sets that test the skill, not memory."""

from edgetune.examples import dates, fields


def test_dates_are_disjoint_and_answers_are_iso():
    train, held_out = dates.generate(seed=3)
    assert len(train) == 600 and len(held_out) == 100
    assert not {r["output"] for r in train} & {r["output"] for r in held_out}
    assert all(len(r["output"]) == 10 and r["output"][4] == "-" for r in held_out)


def test_fields_share_no_name_or_city_with_training():
    train, held_out = fields.generate(seed=3)
    assert fields.generate(seed=3) == (train, held_out)

    def parts(records):
        names = [r["output"].split("; ")[0].split() for r in records]
        return ({n[0] for n in names}, {n[1] for n in names},
                {r["output"].split("; ")[1] for r in records})

    for seen, unseen in zip(parts(train), parts(held_out)):
        assert seen and unseen and not seen & unseen
    for r in held_out:
        name, city = r["output"].split("; ")
        assert name in r["input"] and city in r["input"]
