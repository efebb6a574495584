"""`nitsum sim --report DIR`: the run's tables and plots, written where a reviewer can read them.

What it writes (from the runs `compare()` already made; it simulates nothing itself):

- `summary.md` / `summary.json`: per load, per policy (its best configuration in hindsight where
  it has several): goodput, SLO attainment, reconfigurations and the share of time spent
  adapting; with a sweep, each policy's capacity (highest rate scale held at 90% attainment).
- `goodput-over-time.png`: at the reference load (the highest where the best static plan holds
  90%), each policy's goodput per 5-minute bin of arrival time, with the plan timeline of every
  policy that changes plans underneath.

With `--sensitivity` (it simulates: 2 static runs, 4 forced-change runs and 3 Nitsum runs, at
the reference load; router/sim/sensitivity.py):

- `sensitivity.md` / `sensitivity.json` / `sensitivity.png`: goodput and attainment with TP forced
  to change every 5, 10, 30 and 60 s, against both plans held static; Nitsum with every move's
  pause x0.5, x2 and x5.

Not written (see docs/evidence.md): the per-adaptation overhead table (modelled vs bench.reconfig)
and migration pause against KV size.
"""

from __future__ import annotations

import json
import os

from router.sim.cluster import SimResult, Simulator
from router.sim.report import Summary, summarize
from router.sim.sensitivity import COST_SCALES, FORCED_PERIODS_S, forced_pair, run_forced, run_scaled_cost
from router.sim.sweep import SimSetup
from router.sim.tables import TIMELINE_BIN_S, LoadPoint, policy_summary, reference_load


def write_report(out_dir: str, setup: SimSetup, points: list[LoadPoint]) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    summary = policy_summary(setup.policies, points)
    lines = [f"# {setup.scenario.name if setup.scenario else ', '.join(setup.traces)}: "
             f"{setup.perf.model.name} on {setup.slots} x {setup.perf.device.name}", ""]
    for p in points:
        lines += [f"## rate scale x{p.rate_scale:g}", "",
                  "| policy | config | goodput (req/s) | SLO attainment | reconfigurations | time adapting |",
                  "|---|---|---:|---:|---:|---:|"]
        for name in setup.policies:
            s = p.by_policy.get(name)
            if s is not None:
                lines.append(f"| {name} | {s.label} | {s.goodput:.3f} | {s.attainment:.2%} | {s.reconfigurations} | "
                             f"{s.reconfig_time_frac:.3%} |")
        lines.append("")
    if len(points) > 1:
        lines += ["## capacity (highest rate scale held at 90% SLO attainment)", "",
                  "| policy | capacity | config |", "|---|---:|---|"]
        rows = summary.get("policies", {})
        assert isinstance(rows, dict)
        for name, row in rows.items():
            cap, qual = row["capacity_rate_scale"], row["capacity_qualifier"]
            held = "never" if cap is None else f"{qual}x{cap:.3g}"
            lines.append(f"| {name} | {held} | {row['capacity_config']} |")
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    written = [os.path.join(out_dir, "summary.md"), os.path.join(out_dir, "summary.json")]
    png = os.path.join(out_dir, "goodput-over-time.png")
    if _plot_timeline(reference_load(points), setup.policies, png):
        written.append(png)
    return [f"report: wrote {w}" for w in written]


def _plot_timeline(p: LoadPoint, policies: list[str], out: str) -> bool:
    chosen = [(name, p.by_policy[name].label) for name in policies if name in p.by_policy]
    chosen = [(n, lab) for n, lab in chosen if lab in p.timelines and p.timelines[lab][0]]
    if not chosen:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moving = [(n, lab) for n, lab in chosen if len(p.timelines[lab][2]) > 1]
    fig, axes = plt.subplots(2 if moving else 1, 1, figsize=(12, 7 if moving else 4.5), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.4]} if moving else None, squeeze=False)
    ax = axes[0][0]
    for name, lab in chosen:
        arrived, met, _ = p.timelines[lab]
        hours = [(k + 0.5) * TIMELINE_BIN_S / 3600 for k in range(len(met))]
        style = {"color": "black", "lw": 2.2} if name == "nitsum" else {"lw": 1.1}
        ax.plot(hours, [m / TIMELINE_BIN_S for m in met], label=f"{name} ({lab})", **style)
    arrived = p.timelines[chosen[0][1]][0]
    ax.plot([(k + 0.5) * TIMELINE_BIN_S / 3600 for k in range(len(arrived))], [a / TIMELINE_BIN_S for a in arrived],
            color="grey", ls=":", label="offered (arrivals)")
    ax.set(ylabel="goodput (req/s, per 5 min of arrivals)", title=f"goodput over the run, rate scale x{p.rate_scale:g}")
    ax.legend(fontsize=7)
    if moving:
        tl = axes[1][0]
        names = sorted({plan for _, lab in moving for _, plan in p.timelines[lab][2]})
        for k, (name, lab) in enumerate(moving):
            plans = p.timelines[lab][2]
            end = len(p.timelines[lab][0]) * TIMELINE_BIN_S
            xs = [t / 3600 for t, _ in plans] + [end / 3600]
            ys = [names.index(plan) + 0.08 * k for _, plan in plans]
            tl.step(xs, [*ys, ys[-1]], where="post", label=name)
        tl.set_yticks(range(len(names)), names, fontsize=6)
        tl.set(xlabel="hours into the run", ylabel="plan")
        tl.legend(fontsize=7)
    else:
        ax.set_xlabel("hours into the run")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def write_sensitivity(out_dir: str, setup: SimSetup, points: list[LoadPoint]) -> list[str]:
    """Forced TP changes and move-cost multipliers at the reference load (simulates 9 runs)."""
    os.makedirs(out_dir, exist_ok=True)
    ref = reference_load(points)
    reqs = setup.requests(ref.rate_scale)
    a, b = forced_pair(setup.perf, setup.slots)

    def summary(label: str, res: SimResult) -> Summary:
        return summarize(label, res, setup.tiers, setup.slots)

    statics = [summary(f"static {p.to_str()}", Simulator(list(reqs), setup.perf, setup.tiers, p, setup.cfg).run())
               for p in (a, b)]
    forced = [summary(f"forced every {s:g} s", run_forced(reqs, setup.perf, setup.tiers, setup.slots, setup.cfg, s))
              for s in FORCED_PERIODS_S]
    base = ref.by_policy.get("nitsum")
    scaled = [summary(f"nitsum, move cost x{k:g}", run_scaled_cost(reqs, setup.perf, setup.tiers, setup.slots,
                                                                     setup.cfg, setup.planner_cfg, k))
              for k in COST_SCALES]
    best = max(statics, key=lambda s: s.goodput)
    rows = [*statics, *forced, *([base] if base is not None else []), *scaled]
    lines = [f"# sensitivity at rate scale x{ref.rate_scale:g}", "",
             f"Forced: the whole cluster re-cut between {a.to_str()} and {b.to_str()} every N s; "
             f"ratios against the better static one ({best.label}). Move cost x k: every Nitsum move pauses k x "
             "the modelled time (the planner is not told).", "",
             "| run | goodput (req/s) | vs best static | SLO attainment | reconfigurations | time adapting |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.goodput:.3f} | {r.goodput / max(best.goodput, 1e-9):.3f}x | "
                     f"{r.attainment:.2%} | {r.reconfigurations} | {r.reconfig_time_frac:.2%} |")
    with open(os.path.join(out_dir, "sensitivity.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "sensitivity.json"), "w") as f:
        json.dump({"rate_scale": ref.rate_scale, "runs": [
            {"label": r.label, "goodput": r.goodput, "slo_attainment": r.attainment,
             "reconfigurations": r.reconfigurations, "reconfig_time_frac": r.reconfig_time_frac} for r in rows]},
            f, indent=1)
    png = os.path.join(out_dir, "sensitivity.png")
    _plot_sensitivity(forced, scaled, base, best, png)
    return [f"report: wrote {os.path.join(out_dir, n)}" for n in ("sensitivity.md", "sensitivity.json",
                                                                  "sensitivity.png")]


def _plot_sensitivity(forced: list[Summary], scaled: list[Summary], base: Summary | None, best: Summary,
                      out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(FORCED_PERIODS_S, [s.goodput / max(best.goodput, 1e-9) for s in forced], "o-", color="black")
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set(xscale="log", xlabel="forced TP change every N s", ylabel=f"goodput vs {best.label}",
            title="forced TP changes")
    ks = [0.5, *([1.0] if base is not None else []), *COST_SCALES[1:]]
    runs = [scaled[0], *([base] if base is not None else []), *scaled[1:]]
    ax2.plot(ks, [s.goodput / max(best.goodput, 1e-9) for s in runs], "o-", color="black")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set(xscale="log", xlabel="move cost multiplier", ylabel=f"Nitsum goodput vs {best.label}",
            title="move cost")
    for ax in (ax1, ax2):  # ratios near 1 must read as ratios, not as an offset of 1e-5
        ax.set_ylim(0, 1.1)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
