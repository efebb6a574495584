"""Policy comparison over one load or a sweep of loads, the README table, and the plot.

`compare()` runs every variant of every requested policy on the same trace at each rate scale.
Best-in-hindsight baselines are then the variant with the highest goodput *at that load*. The
README table compares everything with static colocated TP 8 at the highest load where the best
static configuration (any static-colocated or static-disagg variant) still holds 90% SLO
attainment, and reports each policy's best ratio over the sweep at loads where it itself holds
90% attainment.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from router.perfmodel import PerfModel
from router.planner import PlannerConfig
from router.sim.cluster import SimConfig
from router.sim.policies import Variant, run_variant, variants
from router.sim.report import Summary, summarize
from router.sim.trace import load_traces
from services.tiers import Tier

TARGET = 0.9
DEFAULT_SWEEP = (0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


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


@dataclass(frozen=True)
class LoadPoint:
    rate_scale: float
    by_label: dict[str, Summary]  # every variant
    by_policy: dict[str, Summary]  # best variant per policy (best in hindsight)


def compare(setup: SimSetup, scales: list[float], progress: Callable[[str, float], None]) -> list[LoadPoint]:
    points = []
    total = len(scales)
    for i, scale in enumerate(scales):
        reqs = load_traces(setup.traces, setup.tier_map, {t.name for t in setup.tiers}, setup.seed,
                           scale, setup.limit_s)
        runs: list[tuple[Variant, Summary]] = []
        todo = [v for p in setup.policies for v in variants(p, setup.perf, setup.tiers, setup.slots,
                                                              reqs, setup.only_tp)]
        for j, v in enumerate(todo):
            base = (i + j / len(todo)) / total

            def tick(frac: float, base: float = base, label: str = f"x{scale:g} {v.label}",
                     span: float = 1 / (len(todo) * total)) -> None:
                progress(label, base + frac * span)

            res = run_variant(v, reqs, setup.perf, setup.tiers, setup.slots, setup.cfg, setup.planner_cfg, tick)
            runs.append((v, summarize(v.label, res, setup.tiers, setup.slots)))
        best: dict[str, Summary] = {}
        for v, s in runs:
            if v.policy not in best or s.goodput > best[v.policy].goodput:
                best[v.policy] = s
        points.append(LoadPoint(scale, {v.label: s for v, s in runs}, best))
    progress("done", 1.0)
    return points


def readme_table(points: list[LoadPoint]) -> tuple[str, dict[str, object]]:
    """Markdown table of goodput relative to static colocated TP 8 (see module docstring)."""
    ref = "static-colocated tp8"
    if not points or ref not in points[0].by_label:
        return "(no static-colocated tp8 run in this comparison)", {}

    def best_static(p: LoadPoint) -> Summary:
        return max((s for k, s in p.by_label.items() if k.startswith("static-")), key=lambda s: s.goodput)

    held = [p for p in points if best_static(p).attainment >= TARGET]
    at = max(held, key=lambda p: p.rate_scale) if held else max(points, key=lambda p: best_static(p).attainment)
    rows = ["nitsum", *sorted(k for k in at.by_label if k.startswith("static-colocated")),
            "static-colocated", "static-disagg", "priority-only"]
    lines = [f"Load: rate scale x{at.rate_scale:g}, where the best static config ({best_static(at).label}) "
             f"holds {best_static(at).attainment:.1%} SLO attainment"
             + ("" if held else f" (it never reaches {TARGET:.0%} in this sweep)"),
             "", "| policy | goodput (req/s) | SLO attainment | vs static TP8 | best vs TP8 over sweep (load) |",
             "|---|---:|---:|---:|---:|"]
    data: dict[str, object] = {"rate_scale_at_90": at.rate_scale, "held_90": bool(held), "rows": {}}
    for name in rows:
        s = at.by_policy.get(name) if name in ("nitsum", "static-colocated", "static-disagg", "priority-only") \
            else at.by_label.get(name)
        if s is None:
            continue
        key = s.label if name == s.label else f"{name} (best: {s.label})"
        ratio = s.goodput / max(at.by_label[ref].goodput, 1e-9)
        best_ratio, best_at = _best_ratio(points, name, ref)
        lines.append(f"| {key} | {s.goodput:.2f} | {s.attainment:.1%} | {ratio:.2f}x | "
                     + (f"{best_ratio:.2f}x (x{best_at:g})" if best_at else "n/a (never >= 90%)") + " |")
        data["rows"][key] = {"goodput": s.goodput, "attainment": s.attainment, "vs_tp8": ratio,  # type: ignore[index]
                             "best_vs_tp8": best_ratio, "best_vs_tp8_rate_scale": best_at}
    nit = at.by_policy.get("nitsum")
    if nit is not None:
        lines.append(f"\nnitsum at x{at.rate_scale:g}: {nit.reconfigurations} reconfigurations, "
                     f"{nit.reconfig_time_frac:.2%} of the time reconfiguring "
                     f"({nit.reconfig_capacity_frac:.2%} of slot capacity paused)")
    return "\n".join(lines), data


def _best_ratio(points: list[LoadPoint], name: str, ref: str) -> tuple[float, float | None]:
    best, at = 0.0, None
    for p in points:
        s = p.by_policy.get(name) or p.by_label.get(name)
        if s is None or s.attainment < TARGET:
            continue
        r = s.goodput / max(p.by_label[ref].goodput, 1e-9)
        if r > best:
            best, at = r, p.rate_scale
    return best, at


def plot(points: list[LoadPoint], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    labels = sorted({k for p in points for k in p.by_policy} | {k for p in points for k in p.by_label
                                                                 if k.startswith("static-colocated tp")})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = [p.rate_scale for p in points]
    for name in labels:
        ys = [(p.by_policy.get(name) or p.by_label[name]) for p in points]
        style = "-" if name in ("nitsum",) else "--" if "tp" in name else "-."
        ax1.plot(xs, [s.goodput for s in ys], style, marker="o", label=name)
        ax2.plot(xs, [s.attainment for s in ys], style, marker="o", label=name)
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
    elif int(frac * 10) != int(getattr(progress_bar, "_last", -1)):
        progress_bar._last = int(frac * 10)  # type: ignore[attr-defined]
        sys.stderr.write(f"[{bar}] {frac:5.1%} {label}\n")
    sys.stderr.flush()
