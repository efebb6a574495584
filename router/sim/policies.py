"""Nitsum and the baselines, as (plan, scheduler order, engine, planner or not) over the same simulator.

All policies but `vllm-like` get Nitsum's scheduler (deadline-aware order that defers requests
which can no longer make their TTFT, admission control, KV-respecting placement) and Nitsum's
engine (deadline-aware prefill order, the TPOT guard on mixed forwards), the same perf model and
the same engine settings; what distinguishes them is only how the plan is chosen (and, for
priority-only, the order):

- `nitsum`: the planner re-plans every `plan_interval_s`, judging the candidates its model
  proposes by shadow runs on the live traffic (router/sim/twin.py); it starts from
  all-colocated groups of the smallest TP that fits and pays modelled pauses.
- `static-colocated`: one plan for the whole run, every group colocated at one TP degree;
  each degree that fits is run, and the best is chosen in hindsight.
- `static-disagg`: one plan for the whole run with separate prefill and decode groups, one TP
  degree per role and the replica counts of each (DistServe-like); every such split of the slots
  is run and the best is chosen in hindsight.
- `priority-only`: no plan changes; the plan the planner's model rates best for the whole
  trace's average workload, and strict tier priority (FIFO within a tier) instead of deadlines.
- `vllm-like`: static colocated groups as vLLM runs them: first come first served (router and
  engine), a fixed 8192-token budget per forward whatever is decoding, no deferral of requests
  that cannot make their deadline; best TP degree in hindsight. The whole-system baseline.
- `static-any`: every plan the planner could choose (all roles, mixed TP degrees), each static
  for the whole run, best in hindsight; not in `all` (34 runs per load for 70B on 8 slots). It
  is what `--oracle` needs, and it is the *best static plan in hindsight* of every family
  (colocated, disaggregated, mixed).

The peers (router/sim/peers.py has what each models and what it leaves out); not in `all`:

- `dynamo-like`: Dynamo's SLA planner: one TP degree per role from a profile at the trace's mean
  lengths, prefill and decode replica counts re-planned every 60 s from the last 60 s of load;
  Nitsum's scheduler and engine (the comparison isolates how the plan is chosen).
- `llumnix-like tpN`: colocated groups of TP N (each feasible N, best in hindsight), vLLM's engine
  (FCFS, fixed token budget) as Llumnix runs vLLM instances, strict tier priority in the router,
  and live migration of running requests to balance KV load between groups.
- `adaptive-pd tpN`: Nitsum's planner and digital twin with every group held at TP N (roles and
  replica counts still adapt): the ablation that isolates the value of the TP knob. Run at each
  feasible N and the best taken in hindsight, which is at least as good as freezing TP at the
  best static degree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from router.decide.perfmodel import PerfModel
from router.decide.planner import Planner, PlannerConfig
from router.decide.plans import Plan, enumerate_plans, parse_plan
from router.decide.workload import WorkloadEstimate, WorkloadEstimator
from router.sim.cluster import SimConfig, SimResult, Simulator
from router.sim.peers import LlumnixSimulator, dynamo_start, llumnix_config
from router.sim.trace import TraceRequest
from router.sim.twin import Twin
from services.tiers import Tier

POLICIES = ("nitsum", "static-colocated", "static-disagg", "priority-only", "vllm-like", "static-any",
            "dynamo-like", "llumnix-like", "adaptive-pd")
DEFAULT_POLICIES = POLICIES[:5]  # what `--policy all` runs
PEERS = ("dynamo-like", "llumnix-like", "adaptive-pd")
DYNAMO_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Variant:
    policy: str  # one of POLICIES
    label: str  # e.g. "static-colocated tp4", "static-disagg p4,d2,d2"
    plan: Plan
    adaptive: bool
    order: str
    engine: str = "nitsum"  # "nitsum": deadline-aware engine with the TPOT guard; "vllm": FCFS, fixed budget
    freeze_tp: int | None = None  # adaptive-pd: the planner only considers plans of this TP


def feasible_tps(perf: PerfModel, slots: int) -> list[int]:
    return [t for t in (1, 2, 4, 8) if t <= slots and slots % t == 0 and perf.fits(t)]


def variants(policy: str, perf: PerfModel, tiers: tuple[Tier, ...], slots: int,
             requests: list[TraceRequest], only_tp: int | None = None) -> list[Variant]:
    """The runs a policy needs (several for a best-in-hindsight baseline)."""
    tps = feasible_tps(perf, slots)
    if not tps:
        raise ValueError(f"{perf.model.name} does not fit in {slots} {perf.device.name} slot(s) at any TP")
    if policy == "nitsum":
        start = parse_plan(",".join([f"c{tps[0]}"] * (slots // tps[0])), slots)
        return [Variant(policy, "nitsum", start, True, "deadline")]
    if policy in ("static-colocated", "vllm-like"):
        chosen = [only_tp] if only_tp else tps
        if only_tp and only_tp not in tps:
            raise ValueError(f"TP {only_tp} is not feasible here; feasible: {tps}")
        vllm = policy == "vllm-like"
        return [Variant(policy, f"{policy} tp{t}", parse_plan(",".join([f"c{t}"] * (slots // t)), slots),
                        False, "fcfs" if vllm else "deadline", "vllm" if vllm else "nitsum") for t in chosen]
    if policy == "adaptive-pd":
        chosen = [only_tp] if only_tp else tps
        return [Variant(policy, f"adaptive-pd tp{t}", parse_plan(",".join([f"c{t}"] * (slots // t)), slots),
                        True, "deadline", freeze_tp=t) for t in chosen]
    if policy == "llumnix-like":
        chosen = [only_tp] if only_tp else tps
        return [Variant(policy, f"llumnix-like tp{t}", parse_plan(",".join([f"c{t}"] * (slots // t)), slots),
                        False, "priority", "vllm") for t in chosen]
    if policy == "dynamo-like":
        dyn = dynamo_start(perf, tiers, slots, requests)
        start = dyn.plan_for(*dyn.replicas(_whole_trace(requests))[:2])
        return [Variant(policy, f"dynamo-like p{dyn.prefill_tp}/d{dyn.decode_tp}", start, True, "deadline")]
    if policy == "static-any":
        return [Variant(policy, f"static-any {p.to_str()}", p, False, "deadline")
                for p in enumerate_plans(slots, min_tp=tps[0])]
    if policy == "static-disagg":
        plans = [p for p in enumerate_plans(slots, min_tp=tps[0], roles="pd") if _uniform_per_role(p)]
        return [Variant(policy, f"static-disagg {p.to_str()}", p, False, "deadline") for p in plans]
    if policy == "priority-only":
        planner = Planner(perf, tiers, slots)
        return [Variant(policy, "priority-only", planner.best_static(_whole_trace(requests)), False, "priority")]
    raise ValueError(f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}")


def _uniform_per_role(plan: Plan) -> bool:
    return all(len({g.tp for g in plan.groups if g.role == r}) == 1 for r in ("prefill", "decode"))


def _whole_trace(requests: list[TraceRequest]) -> WorkloadEstimate:
    est = WorkloadEstimator(window_s=max(1.0, requests[-1].arrival_s if requests else 1.0), max_samples=256)
    for r in requests:
        est.observe_arrival(r.arrival_s, r.tier, r.prompt_tokens)
        est.observe_finish(r.arrival_s, r.tier, r.output_tokens)
    return est.estimate(requests[-1].arrival_s if requests else 0.0)


def run_variant(v: Variant, requests: list[TraceRequest], perf: PerfModel, tiers: tuple[Tier, ...],
                slots: int, cfg: SimConfig, planner_cfg: PlannerConfig | None = None,
                progress: Callable[[float], None] | None = None) -> SimResult:
    if v.policy == "dynamo-like":
        dyn = dynamo_start(perf, tiers, slots, requests)
        # Dynamo's constant predictor: the next interval's load is the last interval's.
        dyn_cfg = SimConfig(**{**cfg.__dict__, "order": v.order, "plan_interval_s": DYNAMO_INTERVAL_S,
                               "window_s": DYNAMO_INTERVAL_S})
        return Simulator(requests, perf, tiers, v.plan, dyn_cfg, dyn, progress).run()
    if v.policy == "llumnix-like":
        return LlumnixSimulator(requests, perf, tiers, v.plan, llumnix_config(cfg), None, progress).run()
    frozen = (v.freeze_tp,) if v.freeze_tp is not None else None
    planner = Planner(perf, tiers, slots, planner_cfg, tps=frozen) if v.adaptive else None
    engine = {"order": v.order} if v.engine == "nitsum" else {"order": v.order, "tpot_guard": 0.0, "step_cap_share": 0.0}
    sim_cfg = SimConfig(**{**cfg.__dict__, **engine})
    twin = Twin(planner, perf, tiers, sim_cfg, v.plan) if planner is not None else None
    return Simulator(requests, perf, tiers, v.plan, sim_cfg, planner, progress, twin).run()
