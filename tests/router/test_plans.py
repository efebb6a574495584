"""Plan text/JSON forms and enumeration."""

from __future__ import annotations

import pytest

from router.decide.plans import Plan, enumerate_plans, parse_plan


def test_parse_assigns_slots_in_order() -> None:
    plan = parse_plan("p1,d2")
    assert [(g.role, g.slots) for g in plan.groups] == [("prefill", (0,)), ("decode", (1, 2))]
    assert plan.to_str() == "p1,d2" and plan.num_slots == 3


@pytest.mark.parametrize("text, message", [
    ("x1,d2", "unknown role"),
    ("p3,d1", "not a power of two"),
    ("d2,d2", "no prefill group"),
    ("p2,p2", "no decode group"),
    ("p4,d4", "only 4 are available"),
    ("p,d1", "TP degree must follow"),
    ("", "empty"),
])
def test_parse_rejects_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_plan(text, slots=4)


def test_json_round_trip_keeps_slots_and_epoch() -> None:
    plan = parse_plan("c4,p2,d2", slots=8, epoch=7)
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.epoch == 7 and back.groups[2].slots == (6, 7)


def test_json_rejects_overlapping_slots() -> None:
    doc = '{"epoch": 1, "groups": [{"role": "prefill", "slots": [0, 1]}, {"role": "decode", "slots": [1, 2]}]}'
    with pytest.raises(ValueError, match="two groups"):
        Plan.from_json(doc)


def test_enumerate_covers_each_layout_once() -> None:
    plans = enumerate_plans(4, min_tp=2)
    texts = [p.to_str() for p in plans]
    assert len(texts) == len(set(texts))
    assert set(texts) == {"c4", "c2,c2", "c2,d2", "c2,p2", "d2,p2"}
    assert all(p.num_slots == 4 for p in plans)
