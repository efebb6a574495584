"""bench/aiperf.py's arithmetic: the gateway's TTFT p50 is read from its histogram's buckets as
Prometheus's `histogram_quantile` reads it, and a client's per-request TTFTs bucketed the same way."""

from __future__ import annotations

import math

from bench.aiperf import bucketed, quantile

BOUNDS = [0.05, 0.1, 0.25, math.inf]


def test_quantile_interpolates_within_the_bucket_as_prometheus_does() -> None:
    # 10 requests: 2 under 50 ms, 6 in (50, 100], 2 in (100, 250]; p50 is the 5th: 3/6 into (50, 100]
    buckets = [(0.05, 2.0), (0.1, 8.0), (0.25, 10.0), (math.inf, 10.0)]
    assert math.isclose(quantile(0.5, buckets), 0.05 + 0.05 * 3 / 6)
    assert math.isclose(quantile(0.9, buckets), 0.1 + 0.15 * 1 / 2)
    assert math.isnan(quantile(0.5, [(0.05, 0.0), (math.inf, 0.0)]))
    assert quantile(0.99, [(0.05, 0.0), (math.inf, 4.0)]) == 0.05  # in +Inf: the highest finite bound


def test_per_request_values_bucket_like_the_gateway_histogram() -> None:
    values = [0.01, 0.04, 0.06, 0.07, 0.2, 9.0]
    assert bucketed(values, BOUNDS) == [(0.05, 2.0), (0.1, 4.0), (0.25, 5.0), (math.inf, 6.0)]
