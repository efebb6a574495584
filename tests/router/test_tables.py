"""The README table: the load where the best static config holds 90%, capacities, targets; oracle bounds."""

from __future__ import annotations

import numpy as np
import pytest

from router.sim.oracle import bounds
from router.sim.report import Summary
from router.sim.tables import LoadPoint, held_load, policy_capacity, readme_table


def summary(label: str, attainment: float, rate: float, reconf: int = 0) -> Summary:
    return Summary(label, 1000, int(1000 * attainment), 0, attainment, rate * attainment, 100.0, reconf,
                   0.001 * reconf, 0.0005 * reconf, ())


def point(scale: float, att: dict[str, float]) -> LoadPoint:
    by_label = {k: summary(k, a, 10 * scale, reconf=2 if k == "nitsum" else 0) for k, a in att.items()}
    labels: dict[str, tuple[str, ...]] = {}
    for k in by_label:
        policy = k.rsplit(" ", 1)[0] if " " in k else k
        labels[policy] = (*labels.get(policy, ()), k)
    by_policy = {p: max((by_label[k] for k in ks), key=lambda s: s.goodput) for p, ks in labels.items()}
    return LoadPoint(scale, by_label, by_policy, labels)


POINTS = [
    point(0.5, {"nitsum": 0.97, "static-colocated tp4": 0.96, "static-colocated tp8": 0.95, "vllm-like tp8": 0.90,
                "static-disagg p4,d4": 0.93}),
    point(1.0, {"nitsum": 0.85, "static-colocated tp4": 0.91, "static-colocated tp8": 0.80, "vllm-like tp8": 0.70,
                "static-disagg p4,d4": 0.85}),
    point(2.0, {"nitsum": 0.60, "static-colocated tp4": 0.50, "static-colocated tp8": 0.40, "vllm-like tp8": 0.20,
                "static-disagg p4,d4": 0.45}),
]


def test_held_load_interpolates_the_90_percent_crossing() -> None:
    assert held_load(POINTS, "nitsum") == (pytest.approx(0.5 + 0.5 * (0.97 - 0.9) / (0.97 - 0.85)), "")
    assert held_load(POINTS, "vllm-like tp8") == (0.5, "")  # exactly 90% at x0.5, below after
    assert held_load(POINTS[:1], "nitsum") == (0.5, ">=")  # held at the top of the sweep: a lower bound
    assert held_load(POINTS[1:], "nitsum")[1] == "<"  # never held
    cap, q, config = policy_capacity(POINTS, "static-colocated")
    assert config == "static-colocated tp4" and q == "" and cap == pytest.approx(1.0 + (0.91 - 0.9) / 0.41)


def test_readme_table_states_the_load_the_targets_and_their_bound() -> None:
    text, data = readme_table(POINTS)
    assert text.startswith("Load: rate scale x1,") and "static-colocated tp4" in text.splitlines()[0]
    targets = data["targets"]
    assert isinstance(targets, dict)
    # At x1 the best static config meets 91%: nothing can beat it by more than 1/0.91 there.
    assert targets["vs_best_static_bound_at_90_load"] == pytest.approx(1 / 0.91)
    assert targets["vs_best_static_at_90_load"] == pytest.approx(0.85 / 0.91)
    assert targets["capacity_vs_best_static"] < 1 and "NOT MET" in text
    assert targets["best_vs_vllm_tp8"] == pytest.approx(0.97 / 0.90) and targets["reconfigurations_at_90_load"] == 2
    assert "| nitsum |" in text and "vs vLLM-like TP8" in text


def test_oracle_bounds_switching_between_static_plans() -> None:
    # Plan a serves the first 10 s perfectly and nothing after; plan b the opposite, less well.
    arrivals = np.arange(0.0, 40.0, 0.5)
    first = arrivals < 10
    masks = {"a": first.copy(), "b": ~first & (arrivals % 1 == 0)}
    (b10,) = bounds(arrivals, masks, (10.0,), halflife_s=5.0)
    assert b10.best_static == "b" and b10.best_static_attainment == pytest.approx(30 / 80)
    assert b10.clairvoyant == pytest.approx((20 + 30) / 80) and b10.plans_used == 2
    # Follow the leader starts on the best static plan (b), sees a ahead after the first segment
    # (and gets nothing from it), then b once a's record has faded: 0 + 0 + 10 + 10.
    assert b10.follow_leader == pytest.approx(20 / 80)
