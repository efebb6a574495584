"""Policy comparison over one load or a sweep of loads, and the plot (the table: router/sim/tables.py).

`compare()` runs every variant of every requested policy on the same trace at each rate scale.
Best-in-hindsight baselines are then the variant with the highest goodput *at that load*; with
`oracle_segments`, the static runs of every plan (`static-any`) also give the bounds of
router/sim/oracle.py at each load.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from router.decide.perfmodel import PerfModel
from router.decide.planner import PlannerConfig
from router.sim.cluster import SimConfig
from router.sim.oracle import bounds, met_mask
from router.sim.policies import Variant, run_variant, variants
from router.sim.report import Summary, summarize
from router.sim.scenario import Scenario, build_requests
from router.sim.tables import TARGET, TIMELINE_BIN_S, LoadPoint
from router.sim.trace import TraceRequest, load_traces
from services.tiers import Tier

DEFAULT_SWEEP = (0.25, 0.375, 0.5, 0.625, 0.75, 1.0, 1.5, 2.0)


@dataclass(frozen=True)
class SimSetup:
    traces: list[str]
    tier_map: str
    tiers: tuple[Tier, ...]
    slots: int
    perf: PerfModel
    policies: list[str]
    cfg: SimConfig
    planner_cfg: PlannerConfig
    seed: int = 0
    only_tp: int | None = None
    limit_s: float | None = None
    oracle_segments: tuple[float, ...] = ()  # with static-any runs: oracle bounds per segment length
    scenario: Scenario | None = None  # instead of `traces` (router/sim/scenario.py)
    scenario_seed: int | None = None  # None: the scenario's own seed

    def requests(self, scale: float) -> list[TraceRequest]:
        tiers = {t.name for t in self.tiers}
        if self.scenario is not None:
            return build_requests(self.scenario, tiers, self.scenario_seed, scale, self.limit_s)
        return load_traces(self.traces, self.tier_map, tiers, self.seed, scale, self.limit_s)


def compare(setup: SimSetup, scales: list[float], progress: Callable[[str, float], None]) -> list[LoadPoint]:
    points = []
    total = len(scales)
    for i, scale in enumerate(scales):
        reqs = setup.requests(scale)
        runs: list[tuple[Variant, Summary]] = []
        masks: dict[str, np.ndarray] = {}
        timelines: dict[str, tuple[list[int], list[int], list[tuple[float, str]]]] = {}
        todo = [v for p in setup.policies for v in variants(p, setup.perf, setup.tiers, setup.slots,
                                                              reqs, setup.only_tp)]
        for j, v in enumerate(todo):
            base = (i + j / len(todo)) / total

            def tick(frac: float, base: float = base, label: str = f"x{scale:g} {v.label}",
                     span: float = 1 / (len(todo) * total)) -> None:
                progress(label, base + frac * span)

            res = run_variant(v, reqs, setup.perf, setup.tiers, setup.slots, setup.cfg, setup.planner_cfg, tick)
            runs.append((v, summarize(v.label, res, setup.tiers, setup.slots)))
            met = met_mask(res, setup.tiers)
            if setup.oracle_segments and v.policy == "static-any":
                masks[v.plan.to_str()] = met
            timelines[v.label] = _timeline(res.requests, met, res.plans)
        best: dict[str, Summary] = {}
        labels: dict[str, tuple[str, ...]] = {}
        for v, s in runs:
            labels[v.policy] = (*labels.get(v.policy, ()), v.label)
            if v.policy not in best or s.goodput > best[v.policy].goodput:
                best[v.policy] = s
        oracle = bounds(np.array([r.arrival_s for r in reqs]), masks, setup.oracle_segments) if masks else []
        points.append(LoadPoint(scale, {v.label: s for v, s in runs}, best, labels, tuple(oracle), timelines))
    progress("done", 1.0)
    return points


def _timeline(requests: list[TraceRequest], met: np.ndarray,
              plans: list[tuple[float, str]]) -> tuple[list[int], list[int], list[tuple[float, str]]]:
    if not requests:
        return [], [], list(plans)
    idx = (np.array([r.arrival_s for r in requests]) // TIMELINE_BIN_S).astype(int)
    size = int(idx.max()) + 1
    return (np.bincount(idx, minlength=size).tolist(), np.bincount(idx, weights=met, minlength=size).astype(int).tolist(),
            list(plans))


def plot(points: list[LoadPoint], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    # One line per TP-degree variant (the per-policy best would repeat one of them), one per other
    # policy; a TP degree keeps its colour across families, Nitsum is the heavy black line.
    per_tp = {k for p in points for k in p.by_label if k.startswith(("static-colocated tp", "vllm-like tp"))}
    others = {k for p in points for k in p.by_policy} - {"static-colocated", "vllm-like", "static-any"}
    colour = {"2": "tab:blue", "4": "tab:orange", "8": "tab:green", "static-disagg": "tab:purple",
              "priority-only": "tab:brown"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [p.rate_scale for p in points]
    for name in sorted(others - {"nitsum"}) + sorted(per_tp) + (["nitsum"] if "nitsum" in others else []):
        ys = [(p.by_policy.get(name) or p.by_label[name]) for p in points]
        style = {"color": colour.get(name, colour.get(name[-1], "tab:grey")), "marker": "o", "ms": 4,
                 "ls": ":" if name.startswith("vllm") else "--" if "tp" in name else "-."}
        if name == "nitsum":
            style = {"color": "black", "lw": 2.5, "marker": "o", "ms": 5, "ls": "-"}
        ax1.plot(xs, [s.goodput for s in ys], label=name, **style)
        ax2.plot(xs, [s.attainment for s in ys], label=name, **style)
    ax1.set(xlabel="rate scale (x trace rate)", ylabel="goodput (req/s meeting TTFT and TPOT)", title=title)
    ax2.set(xlabel="rate scale (x trace rate)", ylabel="SLO attainment", title="SLO attainment")
    ax2.axhline(TARGET, color="grey", lw=0.8)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def progress_bar(label: str, frac: float) -> None:
    """A one-line bar on stderr, redrawn in place on a terminal, every 10% otherwise."""
    width = 30
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    if sys.stderr.isatty():
        sys.stderr.write(f"\r[{bar}] {frac:5.1%} {label[:50]:<50}")
        if frac >= 1.0:
            sys.stderr.write("\n")
    elif int(frac * 10) != int(getattr(progress_bar, "_last", -1)) or frac >= 1.0:  # every run ends with a line
        progress_bar._last = int(frac * 10)  # type: ignore[attr-defined]
        sys.stderr.write(f"[{bar}] {frac:5.1%} {label}\n")
    sys.stderr.flush()
