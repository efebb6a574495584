"""Figures from simulator runs: per-tier SLO attainment, goodput and latency percentiles.

Goodput is requests per second (over the trace's span) that finished meeting both their tier's
TTFT and TPOT targets; SLO attainment is the share of all requests that did (a shed request
counts as missed). Reconfiguration time is reported as the wall-clock share with some slot
paused, and as the slot-weighted share of capacity lost.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from router.sim.cluster import Reconfiguration, SimResult
from services.tiers import Tier


@dataclass(frozen=True)
class TierSummary:
    tier: str
    requests: int
    met: int
    shed: int
    attainment: float
    goodput: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    tpot_p50: float
    tpot_p90: float
    tpot_p99: float


@dataclass(frozen=True)
class Summary:
    label: str
    requests: int
    met: int
    shed: int
    attainment: float
    goodput: float  # req/s meeting both targets
    duration_s: float
    reconfigurations: int
    reconfig_time_frac: float  # wall-clock share of the run with some slot paused
    reconfig_capacity_frac: float  # slot-seconds paused / (slots x duration)
    tiers: tuple[TierSummary, ...]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def summarize(label: str, result: SimResult, tiers: tuple[Tier, ...], slots: int) -> Summary:
    by_name = {t.name: t for t in tiers}
    duration = max(result.duration_s, 1e-9)
    rows = []
    for tier in tiers:
        idx = [i for i, r in enumerate(result.requests) if r.tier == tier.name]
        if not idx:
            continue
        ttft, tpot, met = [], [], 0
        for i in idx:
            if i in result.shed_reason:
                continue
            r = result.requests[i]
            a, b = result.first_token_s[i] - r.arrival_s, result.finish_s[i] - result.first_token_s[i]
            tp = b / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
            ttft.append(a)
            tpot.append(tp)
            met += by_name[tier.name].met(a, tp)
        shed = sum(1 for i in idx if i in result.shed_reason)
        rows.append(TierSummary(tier.name, len(idx), met, shed, met / len(idx), met / duration,
                                _pct(ttft, 50), _pct(ttft, 90), _pct(ttft, 99),
                                _pct(tpot, 50), _pct(tpot, 90), _pct(tpot, 99)))
    n = len(result.requests)
    met = sum(t.met for t in rows)
    pauses = result.reconfigurations
    return Summary(label, n, met, len(result.shed_reason), met / max(n, 1), met / duration, duration,
                   len(pauses), _union_time(pauses) / duration,
                   sum(p.pause_s * p.slots for p in pauses) / (duration * slots), tuple(rows))


def _union_time(pauses: list[Reconfiguration]) -> float:
    total, end = 0.0, -math.inf
    for p in sorted(pauses, key=lambda p: p.at_s):
        start, stop = max(p.at_s, end), p.at_s + p.pause_s
        total += max(0.0, stop - start)
        end = max(end, stop)
    return total


def format_summary(s: Summary) -> str:
    lines = [f"{s.label}: goodput {s.goodput:.2f} req/s, SLO attainment {s.attainment:.1%} "
             f"({s.met}/{s.requests} met, {s.shed} shed), reconfigurations {s.reconfigurations} "
             f"({s.reconfig_time_frac:.2%} of time, {s.reconfig_capacity_frac:.2%} of slot capacity)"]
    for t in s.tiers:
        lines.append(f"  {t.tier:<12} attain {t.attainment:6.1%}  goodput {t.goodput:6.2f}/s  "
                     f"TTFT p50/p90/p99 {t.ttft_p50:.2f}/{t.ttft_p90:.2f}/{t.ttft_p99:.2f} s  "
                     f"TPOT {t.tpot_p50 * 1e3:.0f}/{t.tpot_p90 * 1e3:.0f}/{t.tpot_p99 * 1e3:.0f} ms  shed {t.shed}")
    return "\n".join(lines)
