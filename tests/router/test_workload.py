"""Workload estimator: sliding-window rates and lengths per tier."""

from __future__ import annotations

import pytest

from router.decide.workload import WorkloadEstimator


def test_rates_and_lengths_follow_the_window() -> None:
    est = WorkloadEstimator(window_s=10.0)
    for i in range(100):  # 10 req/s of 1000-token prompts for 10 s
        est.observe_arrival(i * 0.1, "interactive", 1000)
    for i in range(20):  # then 2 req/s of 100-token prompts
        est.observe_arrival(10.0 + i * 0.5, "batch", 100)
        est.observe_finish(10.0 + i * 0.5, "batch", 50)
    now = est.estimate(20.0)
    by = {t.tier: t for t in now.tiers}
    assert by["batch"].rate == pytest.approx(2.0)
    assert by["batch"].mean_output == 50 and by["batch"].mean_prompt == 100
    assert by["interactive"].rate == pytest.approx(0.0)  # slid out of the window
    early = WorkloadEstimator(window_s=60.0)
    for i in range(10):
        early.observe_arrival(i * 0.5, "standard", 10)
    assert early.estimate(5.0).tiers[0].rate == pytest.approx(2.0)  # not diluted by the unfilled window


def test_observed_score_needs_a_full_window() -> None:
    est = WorkloadEstimator(window_s=10.0)
    est.observe_arrival(0.0, "batch", 10)
    for i in range(30):
        est.observe_outcome(i * 0.5, 2.0 if i % 2 else 0.0)
    assert est.observed_score(5.0) is None
    assert est.observed_score(15.0) == pytest.approx(10 * 2.0 / 10.0)  # 10 met in (5, 15], weight 2
