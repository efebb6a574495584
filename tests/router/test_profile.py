"""`nitsum profile` wiring against the engine's timing API (an engine stand-in with known physics)."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass

import pytest

import router.cli as cli
from router.decide.perfmodel import DEVICES, Efficiency, ModelSpec, PerfModel
from router.profile import Profile, measure, relative_errors

SHAPE = ModelSpec("tiny", 256, 4, 4, 2, 64, 512, 1000, dtype_bytes=4)
TRUTH = PerfModel(DEVICES["cpu"], SHAPE, Efficiency(mem_eff=0.3, flops_eff=0.2, overhead_s=2e-3,
                                                    allreduce_latency_s=1e-4, link_eff=0.5, cache_gain=0.0))


@dataclass
class _Args:
    model: str
    tp: int
    device: str
    dtype: str


class _Engine:
    """Times from a known roofline, with the engine's method names and config fields."""

    def __init__(self, args: _Args) -> None:
        self.tp = args.tp
        self.model_config = types.SimpleNamespace(
            hidden_size=SHAPE.hidden_size, num_hidden_layers=SHAPE.num_layers, num_attention_heads=SHAPE.num_heads,
            num_key_value_heads=SHAPE.num_kv_heads, head_dim=SHAPE.head_dim,
            intermediate_size=SHAPE.intermediate_size, vocab_size=SHAPE.vocab_size)

    def time_prefill(self, num_tokens: int) -> float:
        return TRUTH.prefill_time(num_tokens, self.tp)

    def time_decode_step(self, batch: int, context: int) -> float:
        return TRUTH.decode_step_time(batch, batch * context, self.tp)

    def shutdown(self) -> None:
        pass


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("services.engine")
    mod.LLMEngine = _Engine  # type: ignore[attr-defined]
    mod.EngineArgs = _Args  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "services.engine", mod)


def test_measure_fits_the_engine_within_10_percent(fake_engine: None) -> None:
    prof = measure("/models/tiny", "cpu", [1, 2], [16, 128, 1024], [1, 8, 32], [64, 512])
    assert prof.model.hidden_size == 256 and len(prof.points) == 2 * (3 + 3 * 2)
    assert max(relative_errors(prof.perf_model(), list(prof.points))) < 0.10


def test_profile_command_writes_a_usable_file(fake_engine: None, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "prof.json"
    assert cli.main(["profile", "--model", "/models/tiny", "--tp", "1", "2", "--out", str(out)]) == 0
    prof = Profile.from_json(out.read_text())
    assert json.loads(out.read_text())["model"]["num_layers"] == 4
    assert prof.perf_model().decode_step_time(8, 800, 2) > 0 and "fit error" in capsys.readouterr().out
