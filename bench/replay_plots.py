"""Figures of one replay (PNG, matplotlib's Agg backend): latency CDFs per tier against the tier's
targets, goodput over time per tier, and the plan (each group's TP degree and role) over time.

Each panel is a function drawing on an Axes, so the separate figures and the 2x2 overview share
the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from bench.replay import RequestResult  # noqa: E402
from services.tiers import Tier  # noqa: E402

ROLE_STYLE = {"prefill": "-", "decode": "--"}


def _colors(tiers: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {t: cmap(i % 10) for i, t in enumerate(tiers)}


def latency_cdf(ax: Axes, results: Sequence[RequestResult], tiers: Sequence[Tier], field: str) -> None:
    """CDF of `ttft_s` or `tpot_s` per tier (ok requests), a dotted line at the tier's target."""
    colors = _colors([t.name for t in tiers])
    for tier in tiers:
        xs = np.sort([getattr(r, field) for r in results if r.tier == tier.name and getattr(r, field) is not None])
        if xs.size == 0:
            continue
        ys = np.arange(1, xs.size + 1) / xs.size
        ax.step(xs * 1e3, ys, where="post", color=colors[tier.name], label=f"{tier.name} (n={xs.size})")
        target = tier.ttft_s if field == "ttft_s" else tier.tpot_s
        ax.axvline(target * 1e3, color=colors[tier.name], linestyle=":", linewidth=1)
    name = "TTFT" if field == "ttft_s" else "TPOT"
    ax.set_xscale("log")
    ax.set_xlabel(f"{name} (ms, log); dotted: tier target")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{name} CDF per tier")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="lower right")


def goodput_over_time(ax: Axes, results: Sequence[RequestResult], tiers: Sequence[Tier], wall_s: float,
                      bin_s: float | None = None) -> None:
    """Requests per second that finished meeting both targets, per tier, in bins by finish time;
    the grey line is the arrival rate of all tiers."""
    bin_s = bin_s or max(1.0, round(wall_s / 20))
    edges = np.arange(0.0, wall_s + bin_s, bin_s)
    mids = (edges[:-1] + edges[1:]) / 2
    colors = _colors([t.name for t in tiers])
    for tier in tiers:
        done = [r.finished_s for r in results if r.tier == tier.name and r.met and r.finished_s is not None]
        if any(r.tier == tier.name for r in results):
            counts, _ = np.histogram(done, bins=edges)
            ax.plot(mids, counts / bin_s, color=colors[tier.name], marker="o", markersize=3, label=f"{tier.name} goodput")
    arrivals, _ = np.histogram([r.arrival_s for r in results], bins=edges)
    ax.plot(mids, arrivals / bin_s, color="grey", linestyle="--", label="arrivals (all tiers)")
    ax.set_xlabel(f"time since start (s), {bin_s:g}-s bins")
    ax.set_ylabel("requests / s")
    ax.set_title("Goodput over time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def plan_timeline(ax: Axes, samples: Sequence[dict[str, Any]], wall_s: float) -> None:
    """Each group's TP degree over time (solid: prefill, dashed: decode), from the gateway's /health."""
    groups = sorted({g["group_id"] for s in samples for g in s["groups"]})
    cmap = plt.get_cmap("tab10")
    for i, gid in enumerate(groups):
        ts, tps, role = [], [], "prefill"
        for s in samples:
            g = next((g for g in s["groups"] if g["group_id"] == gid), None)
            ts.append(s["t_s"])
            tps.append(np.nan if g is None else g["tp"] + 0.04 * i)  # a small offset keeps equal lines apart
            role = g["role"] if g is not None else role
        ax.step(ts, tps, where="post", color=cmap(i % 10), linestyle=ROLE_STYLE.get(role, "-"), label=f"{gid} ({role})")
    epochs = [(s["t_s"], max((g["epoch"] for g in s["groups"]), default=None)) for s in samples]
    for (_, e0), (t1, e1) in zip(epochs, epochs[1:], strict=False):
        if e1 is not None and e0 is not None and e1 != e0:
            ax.axvline(t1, color="black", linestyle=":", linewidth=1)
            ax.text(t1, 0.6, f" epoch {e1}", fontsize=7, rotation=90, va="bottom")
    ax.set_xlim(0, max(wall_s, 1.0))
    degrees = sorted({g["tp"] for s in samples for g in s["groups"]} | {1})
    ax.set_yticks(degrees)
    ax.set_ylim(0.5, max(degrees) + 0.5)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("TP degree")
    ax.set_title("Plan: TP degree and role per group" + ("" if groups else " (no /health samples)"))
    ax.grid(True, alpha=0.3)
    if groups:
        ax.legend(fontsize=8)


def write_plots(out_dir: Path, results: Sequence[RequestResult], samples: Sequence[dict[str, Any]],
                tiers: Sequence[Tier], wall_s: float, title: str = "") -> list[Path]:
    """latency_cdf.png, goodput.png, plan.png and overview.png (all four panels) under `out_dir`."""
    used = [t for t in tiers if any(r.tier == t.name for r in results)]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    latency_cdf(axes[0], results, used, "ttft_s")
    latency_cdf(axes[1], results, used, "tpot_s")
    paths.append(_save(fig, out_dir / "latency_cdf.png", title))
    fig, ax = plt.subplots(figsize=(7, 4))
    goodput_over_time(ax, results, used, wall_s)
    paths.append(_save(fig, out_dir / "goodput.png", title))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    plan_timeline(ax, samples, wall_s)
    paths.append(_save(fig, out_dir / "plan.png", title))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    latency_cdf(axes[0][0], results, used, "ttft_s")
    latency_cdf(axes[0][1], results, used, "tpot_s")
    goodput_over_time(axes[1][0], results, used, wall_s)
    plan_timeline(axes[1][1], samples, wall_s)
    paths.append(_save(fig, out_dir / "overview.png", title))
    return paths


def _save(fig: Any, path: Path, title: str) -> Path:
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
