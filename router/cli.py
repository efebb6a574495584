"""`nitsum sim`, `nitsum profile` and `nitsum plan explain`: the router's command-line surface.

`register(subparsers)` and `register_plan(plan_subparsers)` add the subcommands to the `nitsum`
console script (services/cli.py); `python -m router.cli ...` works on its own too. User errors
print one line to stderr and exit 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from router.decide.perfmodel import DEVICES, MODELS, PerfModel
from router.decide.planner import Planner, PlannerConfig
from router.decide.plans import parse_plan
from router.decide.workload import TierLoad, WorkloadEstimate
from router.sim.cluster import SimConfig
from router.sim.oracle import OracleBound
from router.sim.policies import DEFAULT_POLICIES, POLICIES
from router.sim.report import format_summary
from router.sim.scenario import load_scenario
from router.sim.sweep import DEFAULT_SWEEP, SimSetup, compare, plot, progress_bar
from router.sim.tables import LoadPoint, policy_capacity, policy_summary, readme_table
from router.sim.trace import DEFAULT_TIER_MAP
from services.config import TierPolicy
from services.tiers import DEFAULT_TIERS


class UserError(Exception):
    """Something the user can fix; printed as one line."""


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slots", type=int, default=8, help="accelerators in the cluster")
    p.add_argument("--device", default="h200", help=f"built-in device: {', '.join(DEVICES)}")
    p.add_argument("--model", default="llama-3.1-70b", help=f"built-in model: {', '.join(MODELS)}")
    p.add_argument("--profile", help="profile JSON from `nitsum profile` (overrides --device/--model terms)")


def register(subparsers: Any) -> None:
    sim = subparsers.add_parser("sim", help="simulate policies on request traces or a scenario")
    src = sim.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="trace CSV file(s), comma-separated")
    src.add_argument("--scenario", help="scenario JSON (docs/scenarios.md): a workload composed from real traces")
    sim.add_argument("--tier-map", default=DEFAULT_TIER_MAP,
                     help=f"SOURCE=TIER[:SHARE][/TIER:SHARE],... (default {DEFAULT_TIER_MAP})")
    _add_model_args(sim)
    sim.add_argument("--policy", default="all",
                     help=f"comma-separated of {', '.join(POLICIES)}, or all ({', '.join(DEFAULT_POLICIES)})")
    sim.add_argument("--tiers", help="tiers file (JSON/TOML, the gateway's format): SLO targets for every policy "
                                     "(default: services/tiers.py)")
    sim.add_argument("--tpot-guard", type=float, default=SimConfig.tpot_guard,
                     help="share of the tightest TPOT target a mixed forward may take (0: off)")
    sim.add_argument("--oracle", type=str, metavar="SECONDS,...",
                     help="also run every static plan (static-any) and print switching bounds for these "
                          "segment lengths (router/sim/oracle.py)")
    sim.add_argument("--tp", type=int, help="static-colocated: only this TP degree")
    sim.add_argument("--rate-scale", type=float, default=1.0, help="multiply the trace's arrival rate")
    sim.add_argument("--sweep", nargs="?", const=",".join(map(str, DEFAULT_SWEEP)), type=str,
                     help=f"sweep rate scales (default {','.join(map(str, DEFAULT_SWEEP))})")
    sim.add_argument("--duration", type=float, help="only the first SECONDS of the (scaled) trace")
    sim.add_argument("--seed", type=int, help="seed for the tier split and a scenario's arrivals "
                                                "(default 0; a scenario's own seed)")
    sim.add_argument("--plan-interval", type=float, default=5.0, help="seconds between planner runs")
    sim.add_argument("--plot", help="write goodput/attainment vs load to this PNG")
    sim.add_argument("--json", action="store_true", help="final stdout line: one JSON object")
    sim.add_argument("--report", metavar="DIR", help="write tables and PNG plots for the run to DIR "
                                                     "(router/sim/evidence.py)")
    sim.add_argument("--sensitivity", action="store_true",
                     help="with --report: also simulate forced TP changes every 5/10/30/60 s and move cost x0.5/x2/x5 "
                          "at the reference load (9 more runs)")
    sim.set_defaults(func=_guard(_cmd_sim))

    prof = subparsers.add_parser("profile", help="measure the engine and fit the perf model")
    prof.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    prof.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    prof.add_argument("--device-spec", choices=sorted(DEVICES), help="roofline numbers to fit against")
    prof.add_argument("--tp", type=int, nargs="+", default=[1])
    prof.add_argument("--plan", help="profile the slots as `nitsum up --plan PLAN` runs them on this host: its TP "
                                     "degrees, each rank with its share of the cores (overrides --tp)")
    prof.add_argument("--threads", type=int, help="CPU threads per rank (default: with --plan, the cores over the "
                                                  "plan's slots; else torch's default)")
    prof.add_argument("--prefill-tokens", type=_floats, default=[16.0, 64.0, 256.0])
    prof.add_argument("--batches", type=_floats, default=[1.0, 4.0, 16.0])
    prof.add_argument("--contexts", type=_floats, default=[32.0, 256.0])
    prof.add_argument("--out", required=True, help="profile JSON to write")
    prof.set_defaults(func=_guard(_cmd_profile))


def register_plan(plan_subparsers: Any) -> None:
    ex = plan_subparsers.add_parser("explain", help="which plan the planner picks for a load, and why")
    _add_model_args(ex)
    ex.add_argument("--current", help="current plan, e.g. c2,c2,c2,c2 (default: the planner's start)")
    ex.add_argument("--load", default=None,
                    help="per tier RATE:PROMPT:OUTPUT, e.g. interactive=2:2000:30,standard=5:1100:200")
    ex.add_argument("--router", default=None,
                    help="explain the running cluster instead: the autopilot's live estimate, candidates and last "
                         "decision, from this router's admin URL (then --load and the model options are not used)")
    ex.add_argument("--admin-key", default=None, help="with --router: admin key (default: $NITSUM_ADMIN_KEY or "
                                                      ".nitsum/admin-key)")
    ex.add_argument("--json", action="store_true", help="with --router: print the router's JSON answer")
    ex.add_argument("--timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    ex.set_defaults(func=_guard(_cmd_explain))


def _guard(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except (UserError, ValueError, FileNotFoundError, ImportError) as exc:
            print(f"nitsum {args.command if hasattr(args, 'command') else ''}: error: {exc}".replace("  ", " "),
                  file=sys.stderr)
            return 2
    return run


def _perf(args: argparse.Namespace) -> PerfModel:
    if args.profile:
        from router.profile import Profile

        with open(args.profile) as f:
            return Profile.from_json(f.read()).perf_model()
    return PerfModel.builtin(args.device, args.model)


def _cmd_sim(args: argparse.Namespace) -> int:
    policies = list(DEFAULT_POLICIES) if args.policy == "all" else [p.strip() for p in args.policy.split(",")]
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise UserError(f"unknown policy {bad[0]!r}; use {', '.join(POLICIES)} or all")
    if args.sensitivity and not args.report:
        raise UserError("--sensitivity writes into the report: give --report DIR too")
    segments = tuple(_floats(args.oracle)) if args.oracle else ()
    if segments and "static-any" not in policies:
        policies.append("static-any")
    traces = [t for t in (args.trace or "").split(",") if t]
    for t in traces:
        with open(t):
            pass  # FileNotFoundError -> one-line error before any work
    scenario = load_scenario(args.scenario) if args.scenario else None
    tiers = TierPolicy.load(args.tiers).tiers if args.tiers else DEFAULT_TIERS
    setup = SimSetup(traces, args.tier_map, tiers, args.slots, _perf(args), policies,
                     SimConfig(plan_interval_s=args.plan_interval, tpot_guard=args.tpot_guard), PlannerConfig(),
                     args.seed or 0, args.tp, args.duration, segments, scenario, args.seed)
    scales = _floats(args.sweep) if args.sweep else [args.rate_scale]
    points = compare(setup, scales, progress_bar)
    for p in points:
        print(f"== rate scale x{p.rate_scale:g} ==")
        for s in p.by_label.values():
            print(format_summary(s))
        for b in p.oracle:
            print(_oracle_line(b))
    table, table_data = readme_table(points) if len(points) > 1 else ("", {})
    if table:
        print("\n" + table)
    if args.plot:
        plot(points, args.plot, f"{setup.perf.model.name} on {args.slots} x {setup.perf.device.name}")
    if args.report:
        from router.sim.evidence import write_report

        for line in write_report(args.report, setup, points):
            print(line)
        if args.sensitivity:
            from router.sim.evidence import write_sensitivity

            for line in write_sensitivity(args.report, setup, points):
                print(line)
    if args.json:
        out = _json(setup, args, traces, points, table_data)
        out["summary"] = policy_summary(setup.policies, points)
        print(json.dumps(out))
    return 0


def _oracle_line(b: OracleBound) -> str:
    return (f"switching bounds, {b.segment_s:g} s segments: clairvoyant {b.clairvoyant:.1%} "
            f"({b.clairvoyant / max(b.best_static_attainment, 1e-9):.3f}x the best static plan {b.best_static} at "
            f"{b.best_static_attainment:.1%}, {b.plans_used} plans used), follow-the-leader {b.follow_leader:.1%} "
            f"({b.follow_leader / max(b.best_static_attainment, 1e-9):.3f}x)")


def _json(setup: SimSetup, args: argparse.Namespace, traces: list[str], points: list[LoadPoint],
          table: dict[str, object]) -> dict[str, object]:
    return {"device": setup.perf.device.name, "model": setup.perf.model.name, "slots": args.slots,
            "traces": traces, "tier_map": args.tier_map if not setup.scenario else None,
            "scenario": setup.scenario.name if setup.scenario else None,
            "tiers": {t.name: {"ttft_s": t.ttft_s, "tpot_s": t.tpot_s, "weight": t.weight} for t in setup.tiers},
            "loads": [{"rate_scale": p.rate_scale,
                       "policies": {k: _brief(s) for k, s in p.by_policy.items()},
                       "variants": {k: _brief(s) for k, s in p.by_label.items()},
                       "oracle": [vars(b) for b in p.oracle]} for p in points],
            "held_90_rate_scale": {k: dict(zip(("rate_scale", "qualifier", "config"), policy_capacity(points, k),
                                               strict=True))
                                   for k in setup.policies} if len(points) > 1 else {},
            "table": table}


def _brief(s: Any) -> dict[str, Any]:
    return {"label": s.label, "goodput": round(s.goodput, 4), "slo_attainment": round(s.attainment, 4),
            "shed": s.shed, "reconfigurations": s.reconfigurations,
            "reconfig_time_frac": round(s.reconfig_time_frac, 5),
            "reconfig_capacity_frac": round(s.reconfig_capacity_frac, 5),
            "tiers": {t.tier: {"goodput": round(t.goodput, 4), "slo_attainment": round(t.attainment, 4),
                               "ttft_p50": t.ttft_p50, "ttft_p90": t.ttft_p90, "ttft_p99": t.ttft_p99,
                               "tpot_p50": t.tpot_p50, "tpot_p90": t.tpot_p90, "tpot_p99": t.tpot_p99}
                      for t in s.tiers}}


def _cmd_profile(args: argparse.Namespace) -> int:
    from router.profile import measure, relative_errors

    tps, threads = list(args.tp), args.threads
    if args.plan:
        try:
            plan = parse_plan(args.plan)
        except ValueError as e:
            raise UserError(f"--plan {args.plan}: {e}") from None
        tps = sorted({g.tp for g in plan.groups})
        threads = threads or max(1, (os.cpu_count() or 1) // sum(g.tp for g in plan.groups))
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: give 1 or more")
    prof = measure(args.model, args.device, tps, [int(x) for x in args.prefill_tokens],
                   [int(x) for x in args.batches], [int(x) for x in args.contexts], args.device_spec, threads)
    with open(args.out, "w") as f:
        f.write(prof.to_json())
    errs = relative_errors(prof.perf_model(), list(prof.points))
    print(f"{len(prof.points)} points, fit error max {max(errs):.1%} mean {sum(errs) / len(errs):.1%}; "
          f"terms {prof.efficiency.as_dict()} -> {args.out}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    if args.router:
        from router.live.plan_cli import explain_live

        return explain_live(args)
    if not args.load:
        raise UserError("give --load TIER=RATE:PROMPT:OUTPUT,... (or --router URL to explain the running cluster)")
    perf = _perf(args)
    loads = []
    for item in filter(None, args.load.split(",")):
        name, _, spec = item.partition("=")
        try:
            rate, prompt, output = (float(x) for x in spec.split(":"))
        except ValueError:
            raise UserError(f"--load entry {item!r}: write TIER=RATE:PROMPT:OUTPUT") from None
        if name not in {t.name for t in DEFAULT_TIERS}:
            raise UserError(f"--load entry {item!r}: unknown tier {name!r}")
        # A spread of prompt lengths around the mean, so the TTFT tail is not a single point.
        samples = tuple(int(prompt * f) for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.25, 1.5, 1.75))
        loads.append(TierLoad(name, rate, samples, output))
    planner = Planner(perf, DEFAULT_TIERS, args.slots, PlannerConfig())
    tp = next(t for t in (1, 2, 4, 8) if perf.fits(t))
    current = parse_plan(args.current or ",".join([f"c{tp}"] * (args.slots // tp)), args.slots)
    decision, _ = planner.decide(0.0, current, WorkloadEstimate(0.0, 60.0, tuple(loads)))
    print(decision.explanation)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nitsum")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    plan = sub.add_parser("plan", help="plan tools")
    register_plan(plan.add_subparsers(dest="plan_command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
