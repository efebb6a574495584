"""Does the autopilot earn its keep? A load that moves, against every static plan, on this host.

    python -m bench.autopilot [--model DIR] [--phase-s 60] [--profile FILE] [--log-dir DIR] [--out FILE]

One run, 2 slots each pinned to its own core (`nitsum up --pin-slots`), the `small` model:

1. Profile this host as the mesh runs its slots (bench/simfidelity.py's cached `nitsum profile`),
   refit it to the step times serving c1,c1 and c2 meshes measure of themselves (`calibrate`: the slots
   share the host with the rest of the mesh and the load generator), and scale the tiers to it (interactive TTFT = 4x its prompt's prefill, TPOT = 3x a one-row
   decode step; standard twice those).
2. Build the scenario from the fitted model, so that different static plans win different phases:
   phase A is decode-heavy (interactive chat: short prompts, long answers), phase B prefill-heavy
   (standard-tier long prompts, short answers, next to a trickle of interactive chat), then A
   again. Each phase's rate is the one, on a grid, where the planner predicts the largest lead of
   that phase's best plan over the other phase's best plan (as a share of the phase's offered
   weighted load), among rates where each phase's best plan serves at least 70% of it (both
   phases must have different best plans, or the bench says so and stops).
3. Replay the scenario (bench/replay.py: the official openai client, streaming, as `nitsum bench
   replay`) against `nitsum up` on every static plan the planner can choose for 2 slots, and
   against `nitsum up --autopilot on` starting from the plan that is worst for phase A.
4. Replay the same requests through the simulator with this host's profile: each static plan, and
   the adaptive policy with the live loop's planner (modelled, no digital twin), from the same
   start.

Printed: each static plan's goodput per phase (measured: what makes the scenario fair), the
autopilot's, its decisions. The last stdout line is one JSON object with `autopilot_vs_best_static`
(whole-run goodput of the autopilot over the best single static plan's; target >= 1.15),
`autopilot_vs_start_plan`, `decisions` (plan changes), `time_reconfiguring_frac`, and
`sim_autopilot_vs_best_static` (the simulator's prediction of the same ratio), and the bound
both sides allow: `clairvoyant_vs_best_static` (each phase on its best static plan, switching for
free) measured and simulated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import urllib.request
from pathlib import Path
from typing import Any

from bench.mesh import small_model
from bench.replay import ReplayConfig, ReplayRequest, RequestResult, replay
from bench.simfidelity import _served_points, _warm_up, profile_host, served_perf
from router.decide.perfmodel import PerfModel
from router.decide.planner import Planner, PlannerConfig, predict
from router.decide.plans import Plan, parse_plan
from router.decide.workload import TierLoad, WorkloadEstimate
from router.profile import Profile, ProfilePoint
from router.sim.cluster import SimConfig, Simulator
from router.sim.oracle import met_mask
from router.sim.trace import TraceRequest
from services.engine.tp import supported_tps
from services.launch import LaunchConfig, Mesh
from services.tiers import Tier

CHAT = {"prompt": 64, "output": 96}
LONG = {"prompt": 384, "output": 8}
TRICKLE = 0.2  # interactive chat requests a second during phase B
GRID = (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
SIM = SimConfig(chunk_tokens=2048, max_running=64, min_chunk=32, prefill_window=8, plan_interval_s=2.0)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def host_tiers(perf: PerfModel) -> tuple[Tier, ...]:
    ttft = max(0.5, round(4 * perf.prefill_time(CHAT["prompt"], 1), 2))
    tpot = round(3 * perf.decode_step_time(1, CHAT["prompt"], 1), 3)
    return (Tier("interactive", ttft_s=ttft, tpot_s=tpot, weight=4.0, queue_limit=256, max_wait_s=30.0),
            Tier("standard", ttft_s=2 * ttft, tpot_s=2 * tpot, weight=2.0, queue_limit=256, max_wait_s=60.0))


def _estimate(phase: str, rate: float) -> WorkloadEstimate:
    if phase == "A":
        return WorkloadEstimate(0.0, 60.0, (TierLoad("interactive", rate, (CHAT["prompt"],) * 8, CHAT["output"]),))
    return WorkloadEstimate(0.0, 60.0, (TierLoad("interactive", TRICKLE, (CHAT["prompt"],) * 8, CHAT["output"]),
                                        TierLoad("standard", rate, (LONG["prompt"],) * 8, LONG["output"])))


def design(perf: PerfModel, tiers: tuple[Tier, ...], plans: list[Plan]) -> dict[str, Any]:
    """Phase rates where the phases' best plans differ most (by the fitted model)."""
    weight = {t.name: t.weight for t in tiers}

    def ranked(phase: str, rate: float) -> list[tuple[float, str]]:
        w = _estimate(phase, rate)
        return sorted(((predict(p, w, perf, tiers).score, p.to_str()) for p in plans), reverse=True)

    def ceiling(phase: str, rate: float) -> float:
        return sum(weight[t.tier] * t.rate for t in _estimate(phase, rate).tiers)

    best: tuple[float, float, float] | None = None
    for ra in GRID:
        top_a = ranked("A", ra)
        for rb in GRID:
            top_b = ranked("B", rb)
            # Each phase's best plan must serve most of it (a phase nobody can serve tests nothing).
            if (top_a[0][1] == top_b[0][1] or top_a[0][0] < 0.7 * ceiling("A", ra)
                    or top_b[0][0] < 0.7 * ceiling("B", rb)):
                continue
            a_with_b = dict((p, s) for s, p in top_a)[top_b[0][1]]
            b_with_a = dict((p, s) for s, p in top_b)[top_a[0][1]]
            # The lead, in the share of the phase's ceiling the other phase's best plan loses.
            lead = min((top_a[0][0] - a_with_b) / ceiling("A", ra), (top_b[0][0] - b_with_a) / ceiling("B", rb))
            if best is None or lead > best[0]:
                best = (lead, ra, rb)
    if best is None:
        raise SystemExit("bench.autopilot: on this host's profile every load of the grid has the same best plan in "
                         "both phases: no scenario here where adaptation can win")
    lead, ra, rb = best
    return {"rate_a": ra, "rate_b": rb, "predicted_lead": round(lead, 3), "best_a": ranked("A", ra)[0][1],
            "best_b": ranked("B", rb)[0][1], "worst_a": ranked("A", ra)[-1][1],
            "predicted_a": {p: round(s, 3) for s, p in ranked("A", ra)},
            "predicted_b": {p: round(s, 3) for s, p in ranked("B", rb)}}


def scenario(d: dict[str, Any], phase_s: float) -> tuple[list[ReplayRequest], list[tuple[str, float, float]]]:
    reqs: list[tuple[float, str, int, int]] = []
    bounds: list[tuple[str, float, float]] = []
    t0 = 0.0
    for name in ("A", "B", "A"):
        if name == "A":
            reqs += [(t0 + i / d["rate_a"], "interactive", CHAT["prompt"], CHAT["output"])
                     for i in range(int(phase_s * d["rate_a"]))]
        else:
            reqs += [(t0 + i / d["rate_b"], "standard", LONG["prompt"], LONG["output"])
                     for i in range(int(phase_s * d["rate_b"]))]
            reqs += [(t0 + 0.37 + i / TRICKLE, "interactive", CHAT["prompt"], CHAT["output"])
                     for i in range(int(phase_s * TRICKLE))]
        bounds.append((name, t0, t0 + phase_s))
        t0 += phase_s
    reqs.sort()
    return ([ReplayRequest(i, at, tier, f"phase{tier}", p, o, p, o) for i, (at, tier, p, o) in enumerate(reqs)], bounds)


def phase_goodput(arrivals: list[float], met: list[bool], weights: list[float],
                  bounds: list[tuple[str, float, float]]) -> list[float]:
    """Tier-weighted goodput (weighted requests meeting both targets a second) per phase, by arrival."""
    out = []
    for _, a, b in bounds:
        out.append(round(sum(w for t, m, w in zip(arrivals, met, weights, strict=True) if m and a <= t < b) / (b - a), 4))
    return out


def run_live(model: Path, plan: str, tiers: tuple[Tier, ...], reqs: list[ReplayRequest], log_dir: Path,
             autopilot: bool, profile: Path) -> tuple[list[RequestResult], list[dict[str, Any]], list[dict[str, Any]]]:
    tiers_file = log_dir / "tiers.json"
    tiers_file.write_text(json.dumps({"tiers": [vars(t) for t in tiers], "default_tier": "interactive"}))
    name = ("autopilot-from-" if autopilot else "") + plan.replace(",", "-")
    config = LaunchConfig(model=model, plan=plan, port=0, tiers=tiers_file, log_dir=log_dir / name, startup_timeout_s=300,
                          pin_slots=True, autopilot=False, autopilot_interval_s=2.0, autopilot_hold_s=10.0,
                          profile=profile if autopilot else None, autopilot_args=("--autopilot-window", "20"))
    _log(f"[{name}] starting")
    with Mesh(config) as mesh:
        _warm_up(mesh.url, tiers)
        if autopilot:  # off through the warm-up (no phase of the scenario); on from its first request
            _admin(mesh, "POST", "/admin/autopilot", {"enabled": True})
        cfg = ReplayConfig(traces=(), url=mesh.url, tiers=tiers, tier_map="", out_dir=log_dir, max_requests=len(reqs),
                           max_concurrency=1024, context_len=2048, token_ids=(16, 30000), request_timeout_s=900.0,
                           drain_timeout_s=900.0)
        results, _, wall = asyncio.run(replay(cfg, reqs))
        decisions = _admin(mesh, "GET", "/admin/decisions?limit=500").get("decisions", []) if autopilot else []
        reports = _admin(mesh, "GET", "/admin/reconfigurations").get("reconfigurations", [])
    _log(f"[{name}] {len(results)} requests in {wall:.0f} s")
    return results, decisions, reports


def _admin(mesh: Mesh, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(f"{mesh.admin_url}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {mesh.admin_key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


def simulate(perf: PerfModel, tiers: tuple[Tier, ...], plan: str, reqs: list[ReplayRequest],
             planner: Planner | None) -> tuple[list[bool], int]:
    trace = [TraceRequest(r.arrival_s, r.prompt_tokens, r.max_tokens, r.tier, r.source) for r in reqs]
    result = Simulator(trace, perf, tiers, parse_plan(plan, 2), SIM, planner).run()
    return [bool(m) for m in met_mask(result, tiers)], len(result.reconfigurations)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.autopilot", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the small preset)")
    p.add_argument("--phase-s", type=float, default=60.0, help="seconds of each of the three phases")
    p.add_argument("--profile", default=None, help="profile JSON (default: measured, cached in --log-dir)")
    p.add_argument("--log-dir", default=".nitsum/bench-autopilot")
    p.add_argument("--dry-run", action="store_true", help="design the scenario and simulate it; no live runs")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    model = Path(args.model) if args.model else small_model()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    profile_path = Path(args.profile) if args.profile else log_dir / "profile.json"
    shapes = ["c1,c1"] + (["c2"] if 2 in supported_tps(model) else [])
    prof = Profile.from_json(profile_path.read_text()) if args.profile else profile_host(model, shapes, profile_path)
    perf = calibrate(model, prof, log_dir)
    tiers = host_tiers(perf)
    tps = tuple(t for t in supported_tps(model) if t <= 2)
    planner = Planner(perf, tiers, 2, PlannerConfig(min_dwell_s=10.0, horizon_s=60.0), tps)
    plans = planner.candidates
    d = design(perf, tiers, plans)
    reqs, bounds = scenario(d, args.phase_s)
    weights = [next(t.weight for t in tiers if t.name == r.tier) for r in reqs]
    _log(f"tiers {[(t.name, t.ttft_s, t.tpot_s) for t in tiers]}; scenario {json.dumps(d)}; {len(reqs)} requests")

    sim = simulate_all(perf, tiers, plans, reqs, bounds, weights, planner, d["worst_a"], args.phase_s)
    sim_best = max(v["goodput"] for k, v in sim.items() if k != "autopilot")
    _log(f"simulated: {json.dumps(sim)}")
    live = {} if args.dry_run else live_all(model, plans, tiers, reqs, bounds, weights, d["worst_a"], log_dir,
                                            profile_path, args.phase_s)
    best_static = max((v["goodput"], k) for k, v in live.items() if k != "autopilot") if live else (None, None)
    ap = live.get("autopilot", {})
    out: dict[str, Any] = {
        "bench": "autopilot", "model": str(model), "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "slots": 2, "pinned": True,
        "tiers": {t.name: {"ttft_s": t.ttft_s, "tpot_s": t.tpot_s, "weight": t.weight} for t in tiers},
        "scenario": {**d, "phase_s": args.phase_s, "requests": len(reqs)},
        "static_plans": [pl.to_str() for pl in plans], "live": live, "sim": sim,
        "best_static": best_static[1],
        "autopilot_vs_best_static": round(ap["goodput"] / best_static[0], 4) if ap and best_static[0] else None,
        "autopilot_vs_start_plan": (round(ap["goodput"] / live[d["worst_a"]]["goodput"], 4)
                                    if ap and live.get(d["worst_a"], {}).get("goodput") else None),
        "decisions": len(ap.get("decisions", [])) if ap else None,
        "time_reconfiguring_frac": ap.get("time_reconfiguring_frac") if ap else None,
        "sim_autopilot_vs_best_static": round(sim["autopilot"]["goodput"] / sim_best, 4) if sim_best else None,
    }
    # The bound: a clairvoyant that runs each phase's best static plan and switches for free.
    out["clairvoyant_vs_best_static"] = clairvoyant(live) if live else None
    out["sim_clairvoyant_vs_best_static"] = clairvoyant(sim)
    out["target_met"] = bool(out["autopilot_vs_best_static"] and out["autopilot_vs_best_static"] >= 1.15)
    line = json.dumps(out)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


def calibrate(model: Path, prof: Profile, log_dir: Path) -> PerfModel:
    """The profile refitted to the step times serving meshes (c1,c1, and c2 where the model splits
    in two) measure of themselves under both phases' shapes (bench/simfidelity.py's `served_perf`): the slots share this host with the
    gateway, router, Redis and the load generator, which a profile taken alone does not see, and
    a scenario designed on the lone profile overloads every plan."""
    cache = log_dir / "served-profile.json"
    if cache.is_file():
        _log(f"as-served profile: {cache} (cached)")
        return Profile.from_json(cache.read_text()).perf_model()
    lone = host_tiers(prof.perf_model())
    reqs = [ReplayRequest(i, 0.5 * i, "interactive", "calibration", CHAT["prompt"], CHAT["output"], CHAT["prompt"],
                          CHAT["output"]) for i in range(40)]
    reqs += [ReplayRequest(40 + i, 1.0 + 2.0 * i, "standard", "calibration", LONG["prompt"], LONG["output"],
                           LONG["prompt"], LONG["output"]) for i in range(10)]
    reqs.sort(key=lambda r: r.arrival_s)
    tiers_file = log_dir / "tiers.json"
    tiers_file.write_text(json.dumps({"tiers": [vars(t) for t in lone], "default_tier": "interactive"}))
    points: list[ProfilePoint] = []
    for plan in ["c1,c1"] + (["c2"] if 2 in supported_tps(model) else []):  # every TP degree the plans use
        config = LaunchConfig(model=model, plan=plan, port=0, tiers=tiers_file, log_dir=log_dir / f"calibration-{plan}",
                              startup_timeout_s=300, pin_slots=True)
        _log(f"calibrating: a {plan} mesh serving both phases' shapes for ~25 s")
        with Mesh(config) as mesh:
            cfg = ReplayConfig(traces=(), url=mesh.url, tiers=lone, tier_map="", out_dir=log_dir, max_requests=len(reqs),
                               max_concurrency=256, context_len=2048, token_ids=(16, 30000), request_timeout_s=600.0,
                               drain_timeout_s=600.0)
            asyncio.run(replay(cfg, reqs))
            points += asyncio.run(_served_points(mesh))
    perf = served_perf(prof, points)
    if perf is None:
        raise SystemExit("bench.autopilot: the calibration mesh reported no step times")
    cache.write_text(Profile(perf.device, perf.model, tuple(points), perf.eff).to_json())
    return perf


def simulate_all(perf: PerfModel, tiers: tuple[Tier, ...], plans: list[Plan], reqs: list[ReplayRequest],
                 bounds: list[tuple[str, float, float]], weights: list[float], planner: Planner, start: str,
                 phase_s: float) -> dict[str, Any]:
    """Every static plan, then the adaptive policy from `start`, through the simulator."""
    arrivals = [r.arrival_s for r in reqs]
    sim: dict[str, Any] = {}
    for plan in [*plans, None]:
        met, moves = simulate(perf, tiers, plan.to_str() if plan else start, reqs, None if plan else planner)
        entry: dict[str, Any] = {"per_phase": phase_goodput(arrivals, met, weights, bounds),
                                 "goodput": round(sum(w for m, w in zip(met, weights, strict=True) if m) / (3 * phase_s), 4)}
        if plan is None:
            entry["decisions"] = moves
        sim[plan.to_str() if plan else "autopilot"] = entry
    return sim


def live_all(model: Path, plans: list[Plan], tiers: tuple[Tier, ...], reqs: list[ReplayRequest],
             bounds: list[tuple[str, float, float]], weights: list[float], start: str, log_dir: Path,
             profile_path: Path, phase_s: float) -> dict[str, Any]:
    """Every static plan, then the autopilot from `start`, on a live mesh."""
    live: dict[str, Any] = {}
    for plan in plans:
        results, _, _ = run_live(model, plan.to_str(), tiers, reqs, log_dir, False, profile_path)
        live[plan.to_str()] = _summary(results, reqs, weights, bounds, phase_s)
        _log(f"[{plan.to_str()}] per phase {live[plan.to_str()]['per_phase']}")
    results, decisions, reports = run_live(model, start, tiers, reqs, log_dir, True, profile_path)
    ap = _summary(results, reqs, weights, bounds, phase_s)
    switches = [x for x in decisions if x["action"] in ("switch", "failed")]
    ap["decisions"] = [{k: x.get(k) for k in ("at", "action", "plan", "to", "reason")} for x in switches]
    ap["time_reconfiguring_frac"] = round(sum(r["seconds"] for r in reports[1:]) / (3 * phase_s), 4)  # [0]: start-up
    _log(f"[autopilot] per phase {ap['per_phase']}, {len(switches)} moves")
    live["autopilot"] = ap
    return live


def clairvoyant(runs: dict[str, Any]) -> float | None:
    """Goodput of the best static plan of each phase (phases are equally long), over the best
    single static plan's: what any plan switching could gain here, at no cost."""
    static = {k: v for k, v in runs.items() if k != "autopilot"}
    if not static:
        return None
    phases = len(next(iter(static.values()))["per_phase"])
    best_each = sum(max(v["per_phase"][i] for v in static.values()) for i in range(phases)) / phases
    best_one = max(sum(v["per_phase"]) / phases for v in static.values())
    return round(best_each / best_one, 4) if best_one else None


def _summary(results: list[RequestResult], reqs: list[ReplayRequest], weights: list[float],
             bounds: list[tuple[str, float, float]], phase_s: float) -> dict[str, Any]:
    by_index = {r.index: r for r in results}
    met = [bool(by_index[q.index].met) if q.index in by_index else False for q in reqs]
    arrivals = [q.arrival_s for q in reqs]
    return {"per_phase": phase_goodput(arrivals, met, weights, bounds),
            "goodput": round(sum(w for m, w in zip(met, weights, strict=True) if m) / (3 * phase_s), 4),
            "attainment": round(sum(met) / len(met), 4),
            "errors": sum(r.outcome != "ok" for r in results),
            "error_kinds": sorted({(r.error or r.outcome)[:120] for r in results if r.outcome != "ok"})[:5]}


if __name__ == "__main__":
    raise SystemExit(main())
