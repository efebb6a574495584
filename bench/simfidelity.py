"""Simulator fidelity: does `nitsum sim` predict what the live mesh does, request for request?

    python -m bench.simfidelity [--model DIR] [--plans p1,d1 c1,c1] [--duration 300]
                                [--token-scale 0.1] [--load 0.5] [--out FILE]

1. Profile this host as the mesh runs its slots (`nitsum profile --plan`: the plans' TP degrees,
   each rank with its share of the cores) and fit the perf model to it.
2. Take a slice of the two Azure 2023 traces (code -> interactive, conv -> standard 80% / batch
   20%: `nitsum sim`'s default tier map), token counts scaled by `--token-scale` (the small model
   on a CPU is ~1000x slower than an 8B model on an H200) and the arrival rate scaled so the
   prompts offered are `--load` of the prefill group's capacity by the fitted model.
3. Tiers are scaled to the host the same way, from the fitted model: interactive TTFT = 4x the
   prefill of its median prompt (at least 0.5 s) and TPOT = 3x a one-row decode step, standard
   twice those, batch lax (60 s, 2 s).
4. For each plan: play the requests through a live `nitsum up` (the official openai client,
   bench/replay.py, as `nitsum bench replay` does), and through the simulator configured as the
   mesh runs (chunk 2048 tokens, 64 running, the router's prefill window of 8, the tier-aware
   engine policy of services/engine/policy.py).

5. Once more through the simulator with the profile refitted to the step times the mesh's groups
   measured of themselves while serving (their Redis records; what the autopilot refits to): the
   slots share this host with the gateway, router, Redis and the load generator, which a profile
   taken alone does not see (on an accelerator they would not share it).

Reported per plan and tier, sim vs live: SLO attainment, TTFT p50/p90, TPOT p50/p90. The last
stdout line is one JSON object with `attainment_error_max_pp` (target <= 5),
`ttft_p50_rel_error_max` and `tpot_p50_rel_error_max` (targets <= 0.2) for the profile taken
alone, and the same three prefixed `as_served_` for the refitted one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench.isolation import _pct
from bench.mesh import small_model
from bench.replay import ReplayConfig, ReplayRequest, RequestResult, plan_requests, replay
from router.decide.perfmodel import PerfModel
from router.decide.plans import parse_plan
from router.live.autopilot_inputs import telemetry_points
from router.profile import Profile, ProfilePoint, fit, measure, relative_errors
from router.sim.cluster import SimConfig, Simulator
from router.sim.trace import DEFAULT_TIER_MAP, TraceRequest
from services.cluster import ClusterClient
from services.launch import LaunchConfig, Mesh
from services.tiers import Tier

TRACES = ("../shared/traces/AzureLLMInferenceTrace_code.csv", "../shared/traces/AzureLLMInferenceTrace_conv.csv")
CONTEXT = 2048
OUTPUT_CAP = 64


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def profile_host(model: Path, plans: list[str], cache: Path) -> Profile:
    """The fitted profile of this host for these plans (cached per model, plans and thread count)."""
    degrees = sorted({g.tp for p in plans for g in parse_plan(p).groups})
    slots = max(sum(g.tp for g in parse_plan(p).groups) for p in plans)
    threads = max(1, (os.cpu_count() or 1) // slots)
    if cache.is_file():
        prof = Profile.from_json(cache.read_text())
        if sorted({pt.tp for pt in prof.points}) == degrees:
            _log(f"profile: {cache} (cached)")
            return prof
    _log(f"profiling {model} at TP {degrees}, {threads} thread(s) a rank")
    prof = measure(str(model), "cpu", degrees, [16, 64, 256, 512, 1024], [1, 4, 16, 32], [64, 512], threads=threads)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(prof.to_json())
    return prof


def host_tiers(perf: PerfModel, interactive_prompt: int) -> tuple[Tier, ...]:
    ttft = max(0.5, round(4 * perf.prefill_time(interactive_prompt, 1), 2))
    tpot = round(3 * perf.decode_step_time(1, interactive_prompt, 1), 3)
    return (Tier("interactive", ttft_s=ttft, tpot_s=tpot, weight=4.0, queue_limit=256, max_wait_s=30.0),
            Tier("standard", ttft_s=2 * ttft, tpot_s=2 * tpot, weight=2.0, queue_limit=256, max_wait_s=60.0),
            Tier("batch", ttft_s=60.0, tpot_s=2.0, weight=1.0, queue_limit=512, max_wait_s=300.0))


def workload(args: argparse.Namespace, perf: PerfModel, tiers: tuple[Tier, ...], url: str) -> tuple[ReplayConfig, list[ReplayRequest]]:
    """The trace slice at this host's scale: first at rate 1 to measure the offered prompt tokens,
    then at the rate scale that makes them `load` of one TP-1 prefill group's capacity."""
    def config(rate_scale: float, duration: float) -> ReplayConfig:
        return ReplayConfig(traces=tuple(str(Path(t)) for t in args.traces), url=url, tiers=tiers,
                            tier_map=DEFAULT_TIER_MAP, out_dir=Path(args.log_dir), rate_scale=rate_scale,
                            duration_s=duration, max_requests=100_000, max_concurrency=1024, start_s=args.start,
                            token_scale=args.token_scale, context_len=CONTEXT, max_output_tokens=OUTPUT_CAP,
                            token_ids=(16, 30000), seed=0, request_timeout_s=900.0, drain_timeout_s=900.0)
    probe = plan_requests(config(1.0, 600.0))
    span = max(probe[-1].arrival_s, 1e-9)
    offered = sum(r.prompt_tokens for r in probe) / span  # prompt tokens a second at rate 1
    mean_prompt = sum(r.prompt_tokens for r in probe) / len(probe)
    capacity = mean_prompt / perf.prefill_time(int(mean_prompt), 1)
    scale = args.load * capacity / offered
    final = config(scale, args.duration)
    return final, plan_requests(final)


def simulate(perf: PerfModel, tiers: tuple[Tier, ...], plan: str, requests: list[ReplayRequest]) -> list[dict[str, Any]]:
    """The same requests through the simulator, configured as the live mesh runs."""
    trace = [TraceRequest(r.arrival_s, r.prompt_tokens, r.max_tokens, r.tier, r.source) for r in requests]
    slots = sum(g.tp for g in parse_plan(plan).groups)
    cfg = SimConfig(chunk_tokens=2048, max_running=64, min_chunk=32, prefill_window=8)
    result = Simulator(trace, perf, tiers, parse_plan(plan, slots), cfg).run()
    out: list[dict[str, Any]] = []
    by_name = {t.name: t for t in tiers}
    for i, r in enumerate(trace):
        first, end = result.first_token_s[i], result.finish_s[i]
        if i in result.shed_reason or math.isnan(first):
            out.append({"tier": r.tier, "ttft_s": None, "tpot_s": None, "met": False})
            continue
        ttft = first - r.arrival_s
        tpot = (end - first) / (r.output_tokens - 1) if r.output_tokens > 1 else None
        out.append({"tier": r.tier, "ttft_s": ttft, "tpot_s": tpot, "met": by_name[r.tier].met(ttft, tpot or 0.0)})
    return out


def live(model: Path, plan: str, tiers: tuple[Tier, ...], config: ReplayConfig, requests: list[ReplayRequest],
         log_dir: Path) -> tuple[list[dict[str, Any]], list[ProfilePoint]]:
    tiers_file = log_dir / "tiers.json"
    tiers_file.parent.mkdir(parents=True, exist_ok=True)
    tiers_file.write_text(json.dumps({"tiers": [t.__dict__ for t in tiers]}))
    launch = LaunchConfig(model=model, plan=plan, port=0, tiers=tiers_file, log_dir=log_dir / plan.replace(",", "-"),
                          startup_timeout_s=300)
    _log(f"starting the mesh on {plan}")
    with Mesh(launch) as mesh:
        _warm_up(mesh.url, tiers)
        run = ReplayConfig(**{**config.__dict__, "url": mesh.url})
        results, _, wall = asyncio.run(replay(run, requests))
        points = asyncio.run(_served_points(mesh))
    _log(f"{plan}: {len(results)} requests in {wall:.0f} s")
    return [_row(r) for r in results], points


async def _served_points(mesh: Mesh) -> list[ProfilePoint]:
    """The step times the groups measured of themselves while serving (their Redis records)."""
    cluster = ClusterClient(mesh.redis_url, mesh.config.redis_prefix)
    try:
        return telemetry_points(await cluster.groups())
    finally:
        await cluster.close()


def served_perf(prof: Profile, points: list[ProfilePoint]) -> PerfModel | None:
    """The profile refitted to the step times the mesh measured while it served (the slots share
    the host with the gateway, router, Redis and the load generator, which a profile taken alone
    does not see); the profile's own points stand for TP degrees no group ran."""
    if len(points) < 3:
        return None
    seen = {p.tp for p in points}
    base = prof.perf_model()
    return base.with_efficiency(fit(base, points + [p for p in prof.points if p.tp not in seen]))


def _row(r: RequestResult) -> dict[str, Any]:
    return {"tier": r.tier, "ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "met": r.met, "outcome": r.outcome}


def _warm_up(url: str, tiers: tuple[Tier, ...]) -> None:
    """Steps of a few shapes, so each group's step-time model has seen 1 to 8 rows."""
    reqs = [ReplayRequest(i, 0.05 * i, "interactive", "warm-up", 64, 16, 64, 16) for i in range(8)]
    reqs += [ReplayRequest(8 + i, 3.0 + 1.0 * i, "standard", "warm-up", 128, 8, 128, 8) for i in range(3)]
    config = ReplayConfig(traces=(), url=url, tiers=tiers, tier_map="", out_dir=Path("."), max_concurrency=64,
                          token_ids=(16, 30000))
    asyncio.run(replay(config, reqs))


def tier_stats(rows: list[dict[str, Any]], tier: str) -> dict[str, Any]:
    mine = [r for r in rows if r["tier"] == tier]
    ttft = [r["ttft_s"] for r in mine if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in mine if r["tpot_s"] is not None]
    return {"requests": len(mine), "attainment": round(sum(r["met"] for r in mine) / len(mine), 4) if mine else None,
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p90_s": _pct(ttft, 0.9),
            "tpot_p50_s": _pct(tpot, 0.5), "tpot_p90_s": _pct(tpot, 0.9)}


def _rel(sim: float | None, real: float | None) -> float | None:
    return round(abs(sim - real) / real, 4) if sim is not None and real else None


def compare(sim_rows: list[dict[str, Any]], live_rows: list[dict[str, Any]], tiers: tuple[Tier, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in tiers:
        s, r = tier_stats(sim_rows, t.name), tier_stats(live_rows, t.name)
        if not r["requests"]:
            continue
        out[t.name] = {"sim": s, "live": r,
                       "attainment_error_pp": round(100 * abs((s["attainment"] or 0) - (r["attainment"] or 0)), 2),
                       "ttft_p50_rel_error": _rel(s["ttft_p50_s"], r["ttft_p50_s"]),
                       "tpot_p50_rel_error": _rel(s["tpot_p50_s"], r["tpot_p50_s"])}
    return out


def _max(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _errors(prefix: str, per_tier: list[dict[str, Any]]) -> dict[str, float | None]:
    return {f"{prefix}attainment_error_max_pp": _max([v["attainment_error_pp"] for v in per_tier]),
            f"{prefix}ttft_p50_rel_error_max": _max([v["ttft_p50_rel_error"] for v in per_tier]),
            f"{prefix}tpot_p50_rel_error_max": _max([v["tpot_p50_rel_error"] for v in per_tier])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.simfidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the small preset)")
    p.add_argument("--plans", nargs="+", default=["p1,d1", "c1,c1"])
    p.add_argument("--traces", nargs="+", default=list(TRACES))
    p.add_argument("--start", type=float, default=600.0, help="trace seconds to skip (default 600)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds of (scaled) arrivals to play (default 300)")
    p.add_argument("--token-scale", type=float, default=0.1)
    p.add_argument("--load", type=float, default=0.5, help="offered prompt tokens as a share of one prefill group's capacity")
    p.add_argument("--profile", default=None, help="profile JSON to use (default: measure, cached in --log-dir)")
    p.add_argument("--log-dir", default=".nitsum/bench-simfidelity")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    for t in args.traces:
        if not Path(t).is_file():
            raise SystemExit(f"python -m bench.simfidelity: error: trace {t} not found (run from the repository root)")
    model = Path(args.model) if args.model else small_model()
    log_dir = Path(args.log_dir)
    prof = Profile.from_json(Path(args.profile).read_text()) if args.profile else \
        profile_host(model, args.plans, log_dir / f"profile-{model.name}.json")
    perf = prof.perf_model()
    fit_errors = relative_errors(perf, list(prof.points))
    probe_tiers = host_tiers(perf, 128)
    config, requests = workload(args, perf, probe_tiers, "http://127.0.0.1:1")
    inter = sorted(r.prompt_tokens for r in requests if r.tier == "interactive") or [128]
    tiers = host_tiers(perf, inter[len(inter) // 2])
    config = ReplayConfig(**{**config.__dict__, "tiers": tiers})
    _log(f"{len(requests)} requests over {args.duration:.0f} s (rate scale {config.rate_scale:.3f}); tiers "
         f"{[(t.name, t.ttft_s, t.tpot_s) for t in tiers]}; profile fit error max {max(fit_errors):.1%}")
    plans: dict[str, Any] = {}
    for plan in args.plans:
        started = time.monotonic()
        sim_rows = simulate(perf, tiers, plan, requests)
        sim_s = time.monotonic() - started
        live_rows, points = live(model, plan, tiers, config, requests, log_dir)
        served = served_perf(prof, points)
        plans[plan] = {"sim_wall_s": round(sim_s, 2), "live_errors": sum(r.get("outcome") != "ok" for r in live_rows),
                       "tiers": compare(sim_rows, live_rows, tiers),
                       "tiers_as_served": compare(simulate(served, tiers, plan, requests), live_rows, tiers)
                       if served is not None else {}}
        _log(f"{plan}: {json.dumps(plans[plan]['tiers'])}\n  as served: {json.dumps(plans[plan]['tiers_as_served'])}")
    per_tier = [v for pl in plans.values() for v in pl["tiers"].values()]
    served_tier = [v for pl in plans.values() for v in pl["tiers_as_served"].values()]
    out = {"bench": "simfidelity", "model": str(model), "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "profile_fit_error_max": round(max(fit_errors), 4),
           "profile_fit_error_mean": round(sum(fit_errors) / len(fit_errors), 4),
           "efficiency": prof.efficiency.as_dict(), "rate_scale": round(config.rate_scale, 4),
           "token_scale": args.token_scale, "requests": len(requests),
           "tiers": {t.name: {"ttft_s": t.ttft_s, "tpot_s": t.tpot_s} for t in tiers}, "plans": plans,
           **_errors("", per_tier), **_errors("as_served_", served_tier)}
    out["target_met"] = bool((out["attainment_error_max_pp"] or 99) <= 5 and (out["ttft_p50_rel_error_max"] or 9) <= 0.2
                             and (out["tpot_p50_rel_error_max"] or 9) <= 0.2)
    line = json.dumps(out)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
