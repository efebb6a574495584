"""Perf model: public calibration points, physical monotonicity, and fitting a profile."""

from __future__ import annotations

import pytest

from router.decide.perfmodel import DEVICES, MODELS, Efficiency, PerfModel
from router.profile import Profile, ProfilePoint, fit, relative_errors


@pytest.mark.parametrize("model, tp, published_s", [
    ("llama-3.1-8b", 1, 6.5e-3),  # vLLM H200 benchmark, batch 8, short contexts (issue 6)
    ("llama-3.1-70b", 4, 16.2e-3),
])
def test_h200_decode_matches_public_figures_within_25_percent(model: str, tp: int, published_s: float) -> None:
    perf = PerfModel.builtin("h200", model)
    predicted = perf.decode_step_time(8, 8 * 512, tp)
    assert abs(predicted - published_s) / published_s < 0.25


def test_model_shapes_match_published_parameter_counts() -> None:
    assert MODELS["llama-3.1-8b"].num_params == pytest.approx(8.03e9, rel=0.01)
    assert MODELS["llama-3.1-70b"].num_params == pytest.approx(70.6e9, rel=0.01)


@pytest.mark.parametrize("device", sorted(DEVICES))
def test_monotone_where_physics_says_so(device: str) -> None:
    perf = PerfModel(DEVICES[device], MODELS["llama-3.1-8b"])
    for tp in (1, 2, 4, 8):
        prefill = [perf.prefill_time(n, tp) for n in (1, 16, 256, 2048, 8192)]
        assert prefill == sorted(prefill)
        batch = [perf.decode_step_time(b, b * 1024, tp) for b in (1, 8, 64, 256)]
        assert batch == sorted(batch)
        ctx = [perf.decode_step_time(8, c, tp) for c in (0, 1024, 65536, 1 << 20)]
        assert ctx == sorted(ctx)
    # Long prompts are compute-bound: more ranks, less time. More ranks, more KV room.
    assert perf.prefill_time(8192, 8) < perf.prefill_time(8192, 4) < perf.prefill_time(8192, 1)
    assert perf.kv_capacity_tokens(8) > perf.kv_capacity_tokens(1)


def test_higher_tp_lowers_small_batch_tpot_on_h200() -> None:
    perf = PerfModel.builtin("h200", "llama-3.1-70b")
    assert perf.decode_step_time(1, 512, 8) < perf.decode_step_time(1, 512, 4) < perf.decode_step_time(1, 512, 2)


def test_70b_does_not_fit_one_h200() -> None:
    perf = PerfModel.builtin("h200", "llama-3.1-70b")
    assert not perf.fits(1) and perf.fits(2)


def _synthetic_points(truth: PerfModel) -> list[ProfilePoint]:
    pts = [ProfilePoint("prefill", tp, n, 0, truth.prefill_time(n, tp)) for tp in (1, 2) for n in (32, 512, 4096)]
    pts += [ProfilePoint("decode", tp, b, c, truth.decode_step_time(b, b * c, tp))
            for tp in (1, 2) for b in (1, 8, 64) for c in (128, 2048)]
    return pts


def test_fit_reproduces_profile_within_10_percent() -> None:
    truth = PerfModel(DEVICES["cpu"], MODELS["llama-3.1-8b"],
                      Efficiency(mem_eff=0.4, flops_eff=0.25, overhead_s=4e-3, allreduce_latency_s=80e-6,
                                 link_eff=0.3, cache_gain=0.0))
    points = _synthetic_points(truth)
    start = PerfModel(DEVICES["cpu"], MODELS["llama-3.1-8b"], Efficiency())
    fitted = start.with_efficiency(fit(start, points))
    assert max(relative_errors(fitted, points)) < 0.10
    # And it learned the terms, not just the points: an unseen shape is predicted too.
    assert fitted.decode_step_time(32, 32 * 1000, 2) == pytest.approx(truth.decode_step_time(32, 32 * 1000, 2), rel=0.1)


def test_fit_tolerates_noise_and_profile_round_trips() -> None:
    truth = PerfModel(DEVICES["cpu"], MODELS["llama-3.1-8b"], Efficiency(cache_gain=0.0, mem_eff=0.5))
    noisy = [ProfilePoint(p.kind, p.tp, p.tokens, p.context, p.seconds * (1.04 if i % 2 else 0.96))
             for i, p in enumerate(_synthetic_points(truth))]
    perf = PerfModel(DEVICES["cpu"], MODELS["llama-3.1-8b"])
    prof = Profile(perf.device, perf.model, tuple(noisy), fit(perf, noisy))
    again = Profile.from_json(prof.to_json())
    assert again == prof
    assert max(relative_errors(again.perf_model(), noisy)) < 0.10


def test_fit_needs_points() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        fit(PerfModel.builtin("h200", "llama-3.1-8b"), [])
