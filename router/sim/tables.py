"""The README table and the issue's targets, from a load sweep.

Two ways to compare goodput, both reported:

- **At one load** (the issue's table): goodput (requests per second meeting both targets) of
  each policy at the highest sweep load where the best static config (any static-colocated or
  static-disagg variant, chosen in hindsight) still holds 90% SLO attainment. There the best
  static config already meets 90% of all requests, so no policy can beat it by more than
  1 / its attainment (at most 1.11x): a 1.2x target cannot be met at that load by construction.
- **Capacity** (DistServe's definition of goodput: the highest load a config serves at 90%
  attainment): the highest rate scale at which a config holds 90%, interpolated linearly
  between sweep points; a baseline's capacity is its best config's (each config is fixed for
  the whole sweep, as a deployment would be). The 1.2x target is met in this sense or not at all.

Static colocated TP 8 is the reference twice: with Nitsum's scheduler and engine
(`static-colocated tp8`, isolating what the plan buys) and as vLLM runs it (`vllm-like tp8`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from router.sim.oracle import OracleBound
from router.sim.report import Summary

TARGET = 0.9
TIMELINE_BIN_S = 300.0
REF = "static-colocated tp8"
VLLM_REF = "vllm-like tp8"
STATIC = ("static-colocated", "static-disagg")


@dataclass(frozen=True)
class LoadPoint:
    rate_scale: float
    by_label: dict[str, Summary]  # every variant
    by_policy: dict[str, Summary]  # best variant per policy (best in hindsight)
    labels_of: dict[str, tuple[str, ...]]  # policy -> its variants' labels
    oracle: tuple[OracleBound, ...] = ()  # per segment length, when the sweep was asked for them
    # label -> (requests arrived, requests met) per `TIMELINE_BIN_S` of arrival time, and the plan
    # changes (time, plan): what `--report` plots over the run
    timelines: dict[str, tuple[list[int], list[int], list[tuple[float, str]]]] = field(default_factory=dict)


def held_load(points: list[LoadPoint], label: str) -> tuple[float | None, str]:
    """Highest rate scale where `label` holds 90%: (value, "" | ">=" held at the top | "<" never)."""
    pts = [(p.rate_scale, p.by_label[label].attainment) for p in sorted(points, key=lambda p: p.rate_scale)
           if label in p.by_label]
    if not pts or pts[0][1] < TARGET:
        return (pts[0][0] if pts else None), "<"
    for (x0, a0), (x1, a1) in zip(pts, pts[1:], strict=False):
        if a1 < TARGET:
            return x0 + (x1 - x0) * (a0 - TARGET) / (a0 - a1), ""
    return pts[-1][0], ">="


def policy_capacity(points: list[LoadPoint], policy: str) -> tuple[float | None, str, str]:
    """(capacity, qualifier, the config that has it): the policy's best fixed config."""
    labels = {lab for p in points for lab in p.labels_of.get(policy, ())}
    best: tuple[float | None, str, str] = (None, "<", "")
    for lab in sorted(labels):
        x, q = held_load(points, lab)
        if q == "<":
            continue
        if best[0] is None or (x is not None and x > best[0]):
            best = (x, q, lab)
    return best


def _summary(p: LoadPoint, name: str) -> Summary | None:
    return p.by_policy.get(name) or p.by_label.get(name)


def _best_static(p: LoadPoint) -> Summary:
    return max((p.by_policy[k] for k in STATIC if k in p.by_policy), key=lambda s: s.goodput)


def _best_ratio(points: list[LoadPoint], name: str, ref: str) -> tuple[float, float | None]:
    """Best per-load goodput ratio over `ref`, at loads where `name` holds 90%."""
    best, at = 0.0, None
    for p in points:
        s = _summary(p, name)
        if s is None or ref not in p.by_label or s.attainment < TARGET:
            continue
        r = s.goodput / max(p.by_label[ref].goodput, 1e-9)
        if r > best:
            best, at = r, p.rate_scale
    return best, at


def _fmt_load(x: float | None, q: str) -> str:
    return "never" if x is None or q == "<" else f"{'>= ' if q else ''}x{x:.2f}"


def readme_table(points: list[LoadPoint]) -> tuple[str, dict[str, object]]:
    """Markdown table and the target figures (JSON-ready)."""
    if not points or REF not in points[0].by_label or not any(k in points[0].by_policy for k in STATIC):
        return "(the table needs static-colocated tp8 and a static policy in this comparison)", {}
    held = [p for p in points if _best_static(p).attainment >= TARGET]
    at = max(held, key=lambda p: p.rate_scale) if held else max(points, key=lambda p: _best_static(p).attainment)
    bs = _best_static(at)
    static_cap = max((policy_capacity(points, k) for k in STATIC), key=lambda c: c[0] or 0.0)
    vllm = VLLM_REF in at.by_label
    rows = _rows(at)
    lines = [f"Load: rate scale x{at.rate_scale:g}, where the best static config ({bs.label}) holds "
             f"{bs.attainment:.1%} SLO attainment" + ("" if held else f" (never {TARGET:.0%} in this sweep)"),
             "", "| policy | goodput (req/s) | SLO attainment | vs static TP8 |" + (" vs vLLM-like TP8 |" if vllm else "")
             + " highest load held at 90% | best vs static TP8 where it holds 90% (load) |",
             "|---|---:|---:|---:|" + ("---:|" if vllm else "") + "---:|---:|"]
    table: dict[str, object] = {}
    for name, s in rows:
        ratio = s.goodput / max(at.by_label[REF].goodput, 1e-9)
        vratio = s.goodput / max(at.by_label[VLLM_REF].goodput, 1e-9) if vllm else None
        cap = policy_capacity(points, name) if name in at.by_policy else (*held_load(points, name), name)
        best_ratio, best_at = _best_ratio(points, name, REF)
        key = s.label if name == s.label else f"{name} (best: {s.label})"
        lines.append(f"| {key} | {s.goodput:.2f} | {s.attainment:.1%} | {ratio:.2f}x |"
                     + (f" {vratio:.2f}x |" if vratio is not None else "")
                     + f" {_fmt_load(cap[0], cap[1])} | "
                     + (f"{best_ratio:.2f}x (x{best_at:g})" if best_at else "n/a (never >= 90%)") + " |")
        table[key] = {"goodput": s.goodput, "slo_attainment": s.attainment, "vs_static_tp8": ratio,
                      "vs_vllm_tp8": vratio, "held_90_rate_scale": cap[0], "held_90_qualifier": cap[1],
                      "best_vs_static_tp8": best_ratio, "best_vs_static_tp8_rate_scale": best_at}
    data: dict[str, object] = {"rate_scale_at_90": at.rate_scale, "best_static_at_90": bs.label,
                               "best_static_attainment_at_90": bs.attainment, "rows": table}
    nit = at.by_policy.get("nitsum")
    if nit is not None:
        targets = _targets(points, nit, bs, static_cap)
        data["targets"] = asdict(targets)
        lines += ["", *targets.lines()]
    return "\n".join(lines), data


def _rows(at: LoadPoint) -> Iterable[tuple[str, Summary]]:
    order = ["nitsum", *sorted(at.labels_of.get("static-colocated", ())), "static-colocated", "static-disagg",
             "priority-only", *sorted(at.labels_of.get("vllm-like", ())), "vllm-like", "static-any"]
    for name in order:
        s = _summary(at, name)
        if s is not None:
            yield name, s


@dataclass(frozen=True)
class Targets:
    vs_best_static_at_90_load: float
    vs_best_static_bound_at_90_load: float  # 1 / the best static config's attainment there
    capacity_nitsum: float | None  # rate scale held at 90%
    capacity_nitsum_qualifier: str
    capacity_best_static: float | None
    capacity_best_static_config: str
    capacity_vs_best_static: float | None
    best_vs_static_tp8: float
    best_vs_static_tp8_rate_scale: float | None
    best_vs_vllm_tp8: float
    best_vs_vllm_tp8_rate_scale: float | None
    capacity_vs_static_tp8: float | None  # Nitsum's load held at 90% / static-colocated tp8's
    capacity_vs_vllm_tp8: float | None
    reconfigurations_at_90_load: int
    reconfig_time_frac_at_90_load: float
    reconfig_capacity_frac_at_90_load: float
    reconfig_time_frac_max_over_sweep: float

    @property
    def capacity_met(self) -> bool:
        return self.capacity_vs_best_static is not None and self.capacity_vs_best_static >= 1.2

    def lines(self) -> list[str]:
        cap = "n/a" if self.capacity_vs_best_static is None else f"{self.capacity_vs_best_static:.3f}x"
        return [
            f"Target >= 1.2x the best static config: {self.vs_best_static_at_90_load:.3f}x at that load (at most "
            f"{self.vs_best_static_bound_at_90_load:.3f}x is possible there); capacity {cap} (Nitsum holds 90% up "
            f"to {_fmt_load(self.capacity_nitsum, self.capacity_nitsum_qualifier)}, the best static config, "
            f"{self.capacity_best_static_config}, up to {_fmt_load(self.capacity_best_static, '')})"
            + ("" if self.capacity_met else " -- NOT MET"),
            f"Target >= 5x static TP8 where Nitsum holds 90%: best {self.best_vs_static_tp8:.3f}x (at "
            f"x{self.best_vs_static_tp8_rate_scale}) vs static-colocated tp8, {self.best_vs_vllm_tp8:.3f}x (at "
            f"x{self.best_vs_vllm_tp8_rate_scale}) vs vllm-like tp8"
            + ("" if max(self.best_vs_static_tp8, self.best_vs_vllm_tp8) >= 5 else " -- NOT MET")
            + f"; in capacity {_ratio(self.capacity_vs_static_tp8)} and {_ratio(self.capacity_vs_vllm_tp8)}",
            f"Nitsum at that load: {self.reconfigurations_at_90_load} reconfigurations, "
            f"{self.reconfig_time_frac_at_90_load:.2%} of the time reconfiguring "
            f"({self.reconfig_capacity_frac_at_90_load:.2%} of slot capacity); at most "
            f"{self.reconfig_time_frac_max_over_sweep:.2%} of the time at any load of the sweep",
        ]


def _targets(points: list[LoadPoint], nit: Summary, bs: Summary,
             static_cap: tuple[float | None, str, str]) -> Targets:
    cap, q = held_load(points, nit.label)
    tp8_best, tp8_at = _best_ratio(points, "nitsum", REF)
    vllm_best, vllm_at = _best_ratio(points, "nitsum", VLLM_REF)
    sweep_frac = max((p.by_policy["nitsum"].reconfig_time_frac for p in points if "nitsum" in p.by_policy),
                     default=0.0)
    def vs(label: str) -> float | None:
        ref, ref_q = held_load(points, label)
        return cap / ref if cap and ref and q != "<" and ref_q != "<" else None

    ratio = cap / static_cap[0] if cap and static_cap[0] and q != "<" else None
    return Targets(nit.goodput / max(bs.goodput, 1e-9), 1 / max(bs.attainment, 1e-9), cap, q, static_cap[0],
                   static_cap[2], ratio, tp8_best, tp8_at, vllm_best, vllm_at, vs(REF), vs(VLLM_REF),
                   nit.reconfigurations, nit.reconfig_time_frac, nit.reconfig_capacity_frac, sweep_frac)


def _ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def reference_load(points: list[LoadPoint]) -> LoadPoint:
    """The highest load where the best static config holds 90% (the lowest load if none does;
    the only load of a single run)."""
    statics = [k for k in (*STATIC, "static-any") if any(k in p.by_policy for p in points)]
    if len(points) == 1 or not statics:
        return points[0]
    def best(p: LoadPoint) -> float:
        return max((p.by_policy[k].attainment for k in statics if k in p.by_policy), default=0.0)
    held = [p for p in points if best(p) >= TARGET]
    return max(held, key=lambda p: p.rate_scale) if held else min(points, key=lambda p: p.rate_scale)


def policy_summary(policies: list[str], points: list[LoadPoint]) -> dict[str, object]:
    """Per policy: goodput and SLO attainment at the reference load, and capacity (the highest rate
    scale held at 90% attainment; needs a sweep, else null)."""
    if not points:
        return {}
    ref = reference_load(points)
    out: dict[str, object] = {"reference_rate_scale": ref.rate_scale, "policies": {}}
    rows: dict[str, object] = {}
    for name in policies:
        s = ref.by_policy.get(name)
        if s is None:
            continue
        cap = policy_capacity(points, name) if len(points) > 1 else (None, "", "")
        rows[name] = {"label": s.label, "goodput": round(s.goodput, 4), "slo_attainment": round(s.attainment, 4),
                      "capacity_rate_scale": cap[0] if cap[1] != "<" else None,
                      "capacity_qualifier": cap[1] if len(points) > 1 else "needs --sweep",
                      "capacity_config": cap[2], "reconfigurations": s.reconfigurations,
                      "reconfig_time_frac": round(s.reconfig_time_frac, 5)}
    out["policies"] = rows
    return out
