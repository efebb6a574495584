"""Whole meshes (`nitsum up`'s Mesh: real redis-server, real processes on 127.0.0.1) on the tiny model,
one per plan per test module."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from services.tiers import DEFAULT_TIERS

pytest.importorskip("services.engine.make_model")
openai = pytest.importorskip("openai")

from services.launch import LaunchConfig, Mesh  # noqa: E402

E2E_TIERS = {
    "tiers": [{"name": t.name, "ttft_s": t.ttft_s, "tpot_s": t.tpot_s, "weight": t.weight,
               "queue_limit": t.queue_limit, "max_wait_s": t.max_wait_s} for t in DEFAULT_TIERS]
    + [{"name": "scarce", "ttft_s": 5.0, "tpot_s": 1.0, "weight": 1.0, "queue_limit": 1}],
    "default_tier": "standard",
    "api_keys": {"sk-e2e": {"tiers": ["interactive", "standard", "batch", "scarce"]},
                 "sk-batch": {"tiers": ["batch"], "default_tier": "batch"}},
}


@pytest.fixture(scope="session")
def e2e_tiers() -> dict:
    return E2E_TIERS


@pytest.fixture(scope="session")
def start_mesh(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Mesh]:
    """Starts a mesh; use it as a context manager so each module stops its own mesh."""

    def start(plan: str, tiers: dict | None = None) -> Mesh:
        root = tmp_path_factory.mktemp(f"mesh-{plan.replace(',', '-')}")
        tiers_path = None
        if tiers is not None:
            tiers_path = root / "tiers.json"
            tiers_path.write_text(json.dumps(tiers))
        return Mesh(LaunchConfig(model=tiny_model_dir, plan=plan, port=0, tiers=tiers_path, log_dir=root / "logs",
                                 startup_timeout_s=120))

    return start


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path) -> Callable[[list[int], int], list[int]]:
    """Greedy ids from the engine alone (what `nitsum generate` runs), for the same prompt ids."""
    from services.engine import EngineArgs, LLMEngine, SamplingParams

    engine = LLMEngine(EngineArgs(model=str(tiny_model_dir)))

    def generate(prompt_ids: list[int], max_tokens: int) -> list[int]:
        return engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]

    generate.tokenizer = engine.tokenizer  # type: ignore[attr-defined]
    return generate
