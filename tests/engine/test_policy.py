"""The engine schedules by tier and deadline (services/engine/policy.py), as the simulator assumes:
prompts in deadline order with the late ones after, a step's prompt tokens cut to fit the tightest
TPOT target decoding, the least important sequence preempted, and the same tokens whatever the order.
The simulator's group model calls the very same functions."""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from unittest import mock

import pytest

from services.engine import EngineArgs, LLMEngine, SamplingParams, policy
from services.engine.policy import (
    SLO,
    StepTimeModel,
    Waiting,
    guarded_prefill_tokens,
    preemption_victim,
    prefill_order,
)

NOW = 1000.0
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


def test_deadline_order_puts_late_ones_after_and_starved_ones_first() -> None:
    items = {"batch": Waiting(SLO(deadline_s=NOW + 30), 100, 1),
             "interactive": Waiting(SLO(deadline_s=NOW + 0.5), 100, 2),
             "late": Waiting(SLO(deadline_s=NOW + 0.2), 10_000, 3),  # 1 s of prefill left: cannot make it
             "starved": Waiting(SLO(deadline_s=NOW + 60, starved_at_s=NOW - 1), 100, 4)}
    order = prefill_order(list(items), items.__getitem__, NOW, prefill_tokens_per_s=10_000)
    assert order == ["starved", "interactive", "batch", "late"]
    assert prefill_order(list(items), items.__getitem__, NOW, 10_000, policy="fcfs") == list(items)


def test_the_guard_cuts_the_chunk_to_the_tightest_tpot_and_never_below_the_floor() -> None:
    def step(c: int) -> float:  # 10 ms a step with the decode batch, +1 ms per 100 prompt tokens
        return 0.010 + c * 1e-5

    got = guarded_prefill_tokens(2048, 4, 0.030, step, 0.9, 32)
    assert step(got) <= 0.9 * 0.030 + 1e-9 and got >= 1600  # 0.027 s: 1700 tokens
    assert guarded_prefill_tokens(2048, 4, 0.005, step, 0.9, 32) == 32  # the floor
    assert guarded_prefill_tokens(2048, 0, 0.005, step, 0.9, 32) == 2048  # nobody decoding
    assert guarded_prefill_tokens(2048, 4, 0.005, step, 0.9, 32, policy="fcfs") == 2048


def test_the_step_cap_cuts_a_prefill_only_step_so_an_urgent_prompt_waits_one_short_step() -> None:
    def step(c: int) -> float:  # 10 ms + 1 ms per 100 prompt tokens
        return 0.010 + c * 1e-5

    cap = policy.step_cap_s(0.1)  # a quarter of the tightest TTFT target: 25 ms
    got = guarded_prefill_tokens(2048, 0, math.inf, step, 0.9, 32, max_step_s=cap)
    assert step(got) <= cap + 1e-9 and got >= 1400  # 1500 tokens fit 25 ms
    assert guarded_prefill_tokens(2048, 0, math.inf, step, 0.9, 32, policy="fcfs", max_step_s=cap) == 2048
    # Both limits at once: the tighter one wins.
    assert guarded_prefill_tokens(2048, 4, 0.015, step, 0.9, 32, max_step_s=cap) < got


def test_preemption_takes_the_lowest_tier_latest_deadline_and_never_a_heavier_one() -> None:
    seqs = {"i": SLO(deadline_s=NOW + 0.5, weight=4), "s": SLO(deadline_s=NOW + 2, weight=2),
            "b1": SLO(deadline_s=NOW + 30, weight=1), "b2": SLO(deadline_s=NOW + 40, weight=1)}
    running = list(seqs)
    assert preemption_victim("i", running, seqs.__getitem__) == "b2"
    assert preemption_victim("b1", running, seqs.__getitem__) == "b2"
    assert preemption_victim("b1", ["i", "s", "b1"], seqs.__getitem__) == "b1"  # waits itself, not "i" or "s"
    assert preemption_victim("i", running, seqs.__getitem__, policy="fcfs") == "b2"  # the newest


def test_the_step_time_model_learns_a_groups_steps() -> None:
    model = StepTimeModel(min_samples=4)
    assert model.predict(100, 1, 10) == 0.0 and model.coefficients is None
    for p, d, c in [(0, 1, 100), (100, 2, 300), (500, 0, 0), (50, 4, 900), (0, 8, 2000), (1000, 1, 50)]:
        model.observe(p, d, c, 0.002 + 1e-5 * p + 3e-4 * d + 1e-6 * c)
    assert model.predict(200, 3, 500) == pytest.approx(0.002 + 2e-3 + 9e-4 + 5e-4, rel=1e-3)
    assert model.prefill_tokens_per_s() == pytest.approx(1e5, rel=1e-3)
    # Minutes of one shape do not make it forget what the others cost.
    for _ in range(2000):
        model.observe(0, 2, 300, 0.002 + 6e-4 + 3e-4)
    assert model.predict(0, 8, 2000) == pytest.approx(0.002 + 2.4e-3 + 2e-3, rel=1e-3)


def _engine(model: Path, **kw: object) -> LLMEngine:
    return LLMEngine(EngineArgs(model=str(model), **kw))  # type: ignore[arg-type]


def test_the_engine_prefills_by_deadline_and_late_ones_last(llama_dir: Path) -> None:
    engine = _engine(llama_dir, max_num_batched_tokens=8)
    one = SamplingParams(max_tokens=1, ignore_eos=True)  # done at its first token: a step prefills one prompt
    with mock.patch.object(engine.scheduler, "now", return_value=NOW):
        engine.add_request("batch", [1] * 8, one, slo=SLO(deadline_s=NOW + 30))
        engine.add_request("late", [2] * 8, one, slo=SLO(deadline_s=NOW - 1))
        engine.add_request("interactive", [3] * 8, one, slo=SLO(deadline_s=NOW + 0.5))
        order = [o.request_id for _ in range(3) for o in engine.step()]
    assert order == ["interactive", "batch", "late"]


def test_the_engine_guard_cuts_a_steps_prompt_tokens(llama_dir: Path) -> None:
    """A step's planned tokens, not its wall time: with an interactive sequence decoding, a long
    prompt gets only what fits 0.9 x its 50 ms TPOT by the group's own step-time model."""
    engine = _engine(llama_dir, max_num_batched_tokens=512, min_chunk_tokens=16)
    engine.add_request("talk", [5] * 4, SamplingParams(max_tokens=30, ignore_eos=True),
                       slo=SLO(deadline_s=math.inf, tpot_s=0.050, weight=4))
    engine.step()  # its prefill: now it decodes
    engine.scheduler.step_time = model = StepTimeModel()  # a group whose steps took these times:
    for p, d in [(0, 1), (64, 1), (128, 2), (256, 1), (512, 0), (0, 4), (32, 3), (300, 2)]:
        model.observe(p, d, 0, 0.010 + 1e-4 * p + 1e-3 * d)  # 100 prompt tokens: +10 ms
    engine.add_request("essay", [6] * 400, GREEDY, slo=SLO(deadline_s=math.inf, tpot_s=0.5, weight=1))
    _, chunks = engine.scheduler.schedule()
    planned = {c.seq.request_id: c.num_tokens for c in chunks}
    assert planned["talk"] == 1
    assert 0.010 + 1e-3 + 1e-4 * planned["essay"] <= 0.9 * 0.050 + 1e-3 and planned["essay"] >= 300  # ~340
    fcfs = _engine(llama_dir, max_num_batched_tokens=512, schedule="fcfs")
    fcfs.add_request("essay", [6] * 400, GREEDY)
    assert fcfs.scheduler.schedule()[1][0].num_tokens == 400


def test_the_engine_preempts_the_lowest_tier_under_kv_pressure(llama_dir: Path) -> None:
    engine = _engine(llama_dir, num_kv_blocks=6, block_size=4)
    slos = {"i": SLO(weight=4, deadline_s=NOW), "b": SLO(weight=1, deadline_s=NOW + 30),
            "s": SLO(weight=2, deadline_s=NOW + 2)}
    for rid in ("i", "b", "s"):  # 7 prompt tokens each: 2 blocks apiece, all 6 blocks
        engine.add_request(rid, [7] * 7, SamplingParams(max_tokens=10, ignore_eos=True), slo=slos[rid])
    for _ in range(3):  # prefill (7 tokens), 8, then 9 tokens: past 2 blocks, someone gives up its blocks
        engine.step()
    waiting = [s.request_id for s in engine.scheduler.waiting]
    assert waiting == ["b"] and {s.request_id for s in engine.scheduler.running} == {"i", "s"}


def test_greedy_tokens_are_the_same_whatever_the_order(llama_dir: Path) -> None:
    prompts = {"a": [1, 17, 42, 99, 7], "b": [3, 9, 11], "c": [250, 251, 252, 253, 254, 255, 256]}
    slos = {"a": SLO(deadline_s=NOW + 30, weight=1), "b": SLO(deadline_s=NOW + 0.1, weight=4),
            "c": SLO(deadline_s=NOW + 2, tpot_s=0.01, weight=2)}

    def run(schedule: str) -> dict[str, list[int]]:
        engine = _engine(llama_dir, max_num_batched_tokens=6, schedule=schedule, num_kv_blocks=8, block_size=4)
        out: dict[str, list[int]] = {rid: [] for rid in prompts}
        for rid, p in prompts.items():
            engine.add_request(rid, p, SamplingParams(max_tokens=12, ignore_eos=True), slo=slos[rid])
        while engine.has_unfinished():
            for o in engine.step():
                out[o.request_id].extend(o.new_token_ids)
        return out

    assert run("tier") == run("fcfs")


def test_the_simulators_groups_and_the_engine_call_the_same_policy(llama_dir: Path) -> None:
    """Both sides call the functions in services/engine/policy.py: replace them and both see it."""
    from router.decide.perfmodel import PerfModel
    from router.decide.plans import Group
    from router.sim.group import SimGroup

    calls: list[str] = []

    def spy(name: str):  # type: ignore[no-untyped-def]
        real = getattr(policy, name)

        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(name)
            return real(*args, **kwargs)
        return wrapped

    with mock.patch.object(policy, "prefill_order", spy("prefill_order")), \
         mock.patch.object(policy, "guarded_prefill_tokens", spy("guarded_prefill_tokens")):
        engine = _engine(llama_dir, max_num_batched_tokens=16)
        engine.add_request("d", [1] * 4, SamplingParams(max_tokens=8, ignore_eos=True), slo=SLO(tpot_s=0.05))
        engine.step()
        engine.add_request("p", [2] * 40, GREEDY)
        engine.step()
        engine_calls, calls[:] = sorted(set(calls)), []
        perf = PerfModel.builtin("h200", "llama-3.1-8b")
        group = SimGroup("c0", Group("colocated", (0,)), perf, 1000, 16, 64, 8192, lambda *a: None, tpot_guard=0.9,
                         tpot_of=[0.05] * 3, deadline_of=[10.0, 5.0, 7.0])
        group.decoding, group.targets[0.05] = [(5, 0)], 1
        group.prefill_q = deque([[1, 4000, 0], [2, 4000, 0]])
        group._start_chunk(0.0)
        sim_calls = sorted(set(calls))
    assert engine_calls == sim_calls == ["guarded_prefill_tokens", "prefill_order"]
