"""The autopilot end to end: 4 slots, the tiny model, a load that changes phase (short prompts with
long outputs, then long prompts with short outputs, then back), and no admin call. The leading
router re-cuts the cluster on its own at least twice, each time to the plan its planner ranks
first at that moment; every stream ends with the engine's greedy text (no token repeated or
dropped across the re-cuts).

The planner is given a profile (`--profile`, `--autopilot-correct off`) that describes a device
much slower than this host: the tiny model here is so fast next to its Python overheads that, at
a load CI can afford, every plan meets every SLO and the planner rightly keeps what runs. The
slow profile makes the same phases load the modelled cluster, so the loop has something to do;
the first test checks that under this profile the phases do have different best plans.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from router.decide.perfmodel import DEVICES, Efficiency, PerfModel
from router.decide.planner import Planner, PlannerConfig, PlannerState
from router.decide.plans import parse_plan
from router.decide.workload import TierLoad, WorkloadEstimate
from router.live.autopilot_inputs import model_spec
from router.profile import Profile
from services.engine.tp import supported_tps
from services.launch import LaunchConfig, Mesh
from services.tiers import Tier
from tests.e2e.helpers import admin

START = "d1,p1,p1,p1"  # one decode group: the worst plan for the decode-heavy first phase
TIERS = (Tier("interactive", ttft_s=1.0, tpot_s=0.025, weight=4.0, queue_limit=256, max_wait_s=30.0),
         Tier("batch", ttft_s=30.0, tpot_s=0.5, weight=1.0, queue_limit=256, max_wait_s=300.0))
# (name, seconds, requests/s, prompt tokens, output tokens)
PHASES = (("decode-heavy", 16.0, 4.0, 16, 64), ("prefill-heavy", 16.0, 6.0, 480, 4), ("decode-heavy again", 8.0, 4.0, 16, 64))


def slow_profile(model_dir: Path) -> Profile:
    """The tiny model on a modelled device: 1 ms a prompt token, 10 ms a step, 2 ms a decode row."""
    spec = model_spec(model_dir)
    flops_per_token = PerfModel(DEVICES["cpu"], spec).terms(1000, 0, 0, 1).flops / 1000
    eff = Efficiency(mem_eff=1.0, flops_eff=flops_per_token / DEVICES["cpu"].peak_flops / 1e-3, overhead_s=0.01,
                     row_s=0.002, kv_token_s=0.0)
    return Profile(DEVICES["cpu"], spec, (), eff)


def _workload(rate: float, prompt: int, output: int) -> WorkloadEstimate:
    return WorkloadEstimate(0.0, 8.0, (TierLoad("interactive", rate, (prompt,) * 8, float(output)),))


def test_the_phases_have_different_best_plans(tiny_model_dir: Path) -> None:
    profile = slow_profile(tiny_model_dir)
    planner = Planner(profile.perf_model(), TIERS, 4, PlannerConfig(min_dwell_s=0.0), supported_tps(tiny_model_dir))
    current, chosen = parse_plan(START, 4), []
    for _, _, rate, prompt, output in PHASES[:2]:
        decision, _ = planner.decide(100.0, current, _workload(rate, prompt, output), PlannerState())
        assert decision.changed, decision.explanation
        chosen.append(decision.plan.to_str())
        current = decision.plan
    assert chosen[0] != chosen[1], chosen


@pytest.fixture(scope="module")
def mesh(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("autopilot")
    (root / "profile.json").write_text(slow_profile(tiny_model_dir).to_json())
    (root / "tiers.json").write_text(json.dumps({"tiers": [vars(t) for t in TIERS], "default_tier": "interactive"}))
    config = LaunchConfig(model=tiny_model_dir, plan=START, port=0, tiers=root / "tiers.json", log_dir=root / "logs",
                          startup_timeout_s=120, autopilot=True, autopilot_interval_s=1.0, autopilot_hold_s=4.0,
                          profile=root / "profile.json",
                          autopilot_args=("--autopilot-window", "6", "--autopilot-correct", "off"))
    with Mesh(config) as m:
        yield m


def test_the_cluster_follows_the_load_on_its_own(mesh: Mesh, reference) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(8)
    prompts = {n: [[rng.randrange(3, 500) for _ in range(n)] for _ in range(4)] for n in (16, 480)}
    done: list[tuple[int, int, int, str]] = []
    errors: list[str] = []
    bounds: list[tuple[str, float, float]] = []

    async def one(client: openai.AsyncOpenAI, n: int, k: int, out: int) -> None:
        try:
            stream = await client.completions.create(model="tiny", prompt=prompts[n][k], max_tokens=out, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True})
            done.append((n, k, out, "".join([c.choices[0].text async for c in stream if c.choices])))
        except openai.APIError as e:
            errors.append(repr(e))

    async def drive() -> None:
        client = openai.AsyncOpenAI(base_url=f"{mesh.url}/v1", api_key="any", max_retries=0, timeout=120)
        tasks: list[asyncio.Task[None]] = []
        for name, seconds, rate, prompt, output in PHASES:
            start = time.time()
            for i in range(int(seconds * rate)):
                await asyncio.sleep(max(0.0, start + i / rate - time.time()))
                tasks.append(asyncio.create_task(one(client, prompt, i % 4, output)))
            bounds.append((name, start, time.time()))
        await asyncio.gather(*tasks)
        await client.close()

    asyncio.run(drive())
    assert not errors, errors[:3]
    status, doc = admin(mesh, "GET", "/admin/decisions?limit=500")
    assert status == 200, doc
    decisions: list[dict[str, Any]] = doc["decisions"]
    switches = [d for d in decisions if d["action"] == "switch"]
    assert len(switches) >= 2, [(d["action"], d["reason"]) for d in decisions[-10:]]
    for d in switches:  # each move goes where the planner ranked first at that moment, and took
        assert d["to"] == d["ranking"][0][0], d
        assert d["report"]["result"] == "committed", d
    phase_of = [next((name for name, a, b in bounds if a <= d["at"] <= b + 4.0), "after") for d in switches]
    assert "decode-heavy" in phase_of and "prefill-heavy" in phase_of, list(zip(phase_of, switches, strict=True))
    targets = {d["to"] for d in switches}
    assert len(targets) >= 2, targets

    status, shown = admin(mesh, "GET", "/admin/plan")
    assert status == 200 and shown["epoch"] >= 1 + len(switches)  # start-up, then one epoch per move

    want = {(n, k, out): reference.tokenizer.decode(reference(prompts[n][k], out)) for n, k, out, _ in done}
    wrong = [(n, k, out) for n, k, out, text in done if text != want[(n, k, out)]]
    assert len(done) == sum(int(s * r) for _, s, r, _, _ in PHASES)
    assert not wrong, f"{len(wrong)} of {len(done)} streams differ from the engine's greedy text, e.g. {wrong[:3]}"
