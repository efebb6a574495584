"""Scenarios: ServeGen clients' windowed rate and CV reproduced, deterministic for a seed, every
source accounted for, and the simulator ending every scenario request exactly once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from router.sim.cluster import SimConfig, SimResult
from router.sim.policies import run_variant, variants
from router.sim.scenario import build_requests, load_scenario, parse_scenario
from router.sim.servegen import Window, load_client, weibull_shape_for_cv, window_arrivals
from services.tiers import DEFAULT_TIERS
from tests.router.test_sim import PERF, check_accounting

TIERS = {t.name for t in DEFAULT_TIERS}
# Client 1: Gamma, CV 2; Weibull, CV 3; silent; Gamma, CV 1. Client 2: small, steady. Client 3: a bulk starter.
ROWS = {1: [(0, 8.0, 2.0, "Gamma"), (600, 5.0, 3.0, "Weibull"), (1200, 0.0, 0.0, ""), (1800, 8.0, 1.0, "Gamma")],
        2: [(0, 1.0, 1.0, "Gamma"), (600, 1.0, 1.0, "Gamma"), (1200, 1.0, 1.0, "Gamma"), (1800, 1.0, 1.0, "Gamma")],
        3: [(0, 0.0, 0.0, ""), (600, 0.0, 0.0, ""), (1200, 3.0, 1.2, "Gamma"), (1800, 3.0, 1.2, "Gamma")]}


def _cv(times: np.ndarray) -> float:
    gaps = np.diff(times)
    return float(gaps.std() / gaps.mean())


@pytest.fixture
def folder(tmp_path: Path) -> str:
    """A ServeGen folder laid out as upstream's: trace CSVs (no header), a dataset for client 1 only."""
    for cid, rows in ROWS.items():
        with open(tmp_path / f"chunk-{cid}-trace.csv", "w") as f:
            for start, rate, cv, fam in rows:
                shape, scale = ((1 / cv ** 2, cv ** 2 / rate) if fam == "Gamma" else (0.5, 1.0)) if fam else ("", "")
                f.write(f"{start},{rate},{cv},{fam},{shape},{scale}\n")
    data = {"0": {"input_tokens": "{100: 0.5, 300: 0.5}", "output_tokens": "{20: 1.0}"},
            "1200": {"input_tokens": "{2000: 1.0}", "output_tokens": "{400: 0.25, 600: 0.75}"}}
    (tmp_path / "chunk-1-dataset.json").write_text(json.dumps(data))
    return str(tmp_path)


def _azure(tmp_path: Path) -> str:
    path = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    rows = [f"2023-11-16 18:00:{s:02d}.0000000,{500 + 10 * s},{50 + s}" for s in range(40)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    return str(path)


def _scenario(folder: str, azure: str, **extra: object) -> dict[str, object]:
    return {"name": "t", "seed": 5, "sources": [
        {"type": "servegen", "folder": folder, "start_s": 0, "end_s": 2400, "clients": [
            {"ids": [1], "tier": "interactive"}, {"ranks": [1, 1], "tier": "standard"},
            {"rest": True, "tier": "standard:0.5/batch:0.5"}],
         "lengths": {"azure": azure}},
        {"type": "bulk", "at_s": 1000, "count": 200, "tier": "batch", "lengths": {"fixed": [1500, 300]}},
        {"type": "azure", "path": azure, "tier": "interactive", "offset_s": 100, "rate_scale": 2.0}], **extra}


def test_servegen_windows_reproduce_rate_and_cv(folder: str) -> None:
    client = load_client(folder, 1)
    for w, end in zip(client.windows[:2], (600, 1200), strict=True):
        cvs = []
        for seed in range(4):
            t = window_arrivals(w, w.start_s, end, 1.0, np.random.default_rng(seed))
            assert abs(len(t) - w.rate * 600) <= 1 and ((t >= w.start_s) & (t < end)).all()
            cvs.append(_cv(t))
        # 3000-4800 gaps per window: the sample CV is within a few per cent of the recorded one.
        assert abs(np.mean(cvs) - w.cv) / w.cv < 0.1, (w, cvs)
    # A fractional expected count is rounded stochastically: unbiased where upstream rounds up.
    w = Window(0, 0.001, 1.0, "Gamma", 1.0, 1000.0)
    counts = [len(window_arrivals(w, 0, 600, 1.0, np.random.default_rng(s))) for s in range(2000)]
    assert abs(np.mean(counts) - 0.6) < 0.05


def test_weibull_shape_matches_the_recorded_cv() -> None:
    for cv in (0.5, 1.0, 3.0, 8.6):
        k = weibull_shape_for_cv(cv)
        g1, g2 = math.gamma(1 + 1 / k), math.gamma(1 + 2 / k)
        assert math.sqrt(g2 / g1 ** 2 - 1) == pytest.approx(cv, rel=1e-6)
    assert weibull_shape_for_cv(1.0) == pytest.approx(1.0, rel=1e-6)  # CV 1: the exponential


def test_scenario_maps_clients_and_sources_and_is_deterministic(folder: str, tmp_path: Path) -> None:
    azure = _azure(tmp_path)
    sc = parse_scenario(_scenario(folder, azure))
    a, b = build_requests(sc, TIERS), build_requests(sc, TIERS)
    assert a == b and a != build_requests(sc, TIERS, seed=6)
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)
    by = {src: [r for r in a if r.source == src] for src in {r.source for r in a}}
    # Client 1 by id -> interactive, with its own lengths per dataset entry. It is also rank 1 by
    # volume, but the first group that names a client takes it; clients 2 and 3 are the rest.
    c1 = by["servegen:1"]
    assert {r.tier for r in c1} == {"interactive"}
    assert {r.prompt_tokens for r in c1 if r.arrival_s < 1200} <= {100, 300}
    assert {r.prompt_tokens for r in c1 if r.arrival_s >= 1200} == {2000}
    assert not [r for r in c1 if 1200 <= r.arrival_s < 1800]  # its silent window
    assert abs(sum(1 for r in c1 if r.arrival_s < 600) - 4800) <= 1
    # Clients without a dataset take the source's fallback lengths (the Azure rows').
    fallback = {(500 + 10 * s, 50 + s) for s in range(40)}
    assert {(r.prompt_tokens, r.output_tokens) for r in by["servegen:2"] + by["servegen:3"]} <= fallback
    assert {r.tier for r in by["servegen:3"]} == {"standard", "batch"}
    assert not [r for r in by["servegen:3"] if r.arrival_s < 1200]  # it starts in bulk at 1200 s
    bulk = by["bulk:1"]
    assert len(bulk) == 200 and {r.arrival_s for r in bulk} == {1000.0} and {r.tier for r in bulk} == {"batch"}
    az = by["azure:conv"]
    assert len(az) == 40 and az[0].arrival_s == 100 and az[-1].arrival_s == pytest.approx(100 + 39 / 2)
    # A rate scale scales every source: twice the servegen rate, twice the bulk job.
    double = build_requests(sc, TIERS, rate_scale=2.0)
    assert sum(1 for r in double if r.source == "bulk:1") == 400
    assert abs(sum(1 for r in double if r.source == "servegen:1" and r.arrival_s < 600) - 9600) <= 1


def test_ranks_follow_volume_in_the_window(folder: str, tmp_path: Path) -> None:
    azure = _azure(tmp_path)
    doc = _scenario(folder, azure)
    doc["sources"] = [{"type": "servegen", "folder": folder, "start_s": 1200, "end_s": 2400,
                       "clients": [{"ranks": [1, 1], "tier": "batch"}], "lengths": {"azure": azure}}]
    reqs = build_requests(parse_scenario(doc), TIERS)
    # In [1200, 2400) client 1 sends 8/s for 600 s (4800), client 3 3/s for 1200 s (3600): rank 1 is client 1.
    assert {r.source for r in reqs} == {"servegen:1"} and reqs[0].arrival_s >= 0
    assert min(r.arrival_s for r in reqs) >= 600  # scenario time 0 is the window's start (1200 s)


@pytest.mark.parametrize("bad, message", [
    ({"sources": []}, "'sources' is empty"),
    ({"sources": [{"type": "bulk", "at_s": 0, "count": 3, "tier": "batch"}]}, "needs 'lengths'"),
    ({"sources": [{"type": "bulk", "at_s": 0, "count": 3, "tier": "gold", "lengths": {"fixed": [1, 1]}}]},
     "unknown tier"),
    ({"sources": [{"type": "servegen", "folder": "/nonexistent", "end_s": 10, "clients": []}]}, "does not exist"),
    ({"sources": [{"type": "azure", "path": "x.csv", "tier": "batch", "speed": 2}]}, "unknown field"),
])
def test_invalid_scenarios_say_what_to_fix(bad: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sc = parse_scenario({"name": "bad", **bad})
        build_requests(sc, TIERS)


def test_client_without_lengths_and_no_fallback_is_an_error(folder: str) -> None:
    sc = parse_scenario({"sources": [{"type": "servegen", "folder": folder, "end_s": 600,
                                      "clients": [{"ids": [2], "tier": "batch"}]}]})
    with pytest.raises(ValueError, match="client 2 has no chunk-2-dataset.json"):
        build_requests(sc, TIERS)


def test_every_scenario_request_ends_exactly_once_for_every_new_policy(folder: str, tmp_path: Path) -> None:
    # 10 minutes of the small folder at a load that overloads 8 slots in the bulk job's wake.
    doc = _scenario(folder, _azure(tmp_path), duration_s=120.0)
    doc["sources"][1].update(at_s=20, count=500, lengths={"fixed": [6000, 200]})  # type: ignore[index]
    reqs = build_requests(parse_scenario(doc), TIERS, rate_scale=0.5)
    assert len(reqs) > 500
    for policy in ("dynamo-like", "llumnix-like", "adaptive-pd"):
        v = variants(policy, PERF, DEFAULT_TIERS, 8, reqs, only_tp=4 if policy != "dynamo-like" else None)[0]
        res = run_variant(v, reqs, PERF, DEFAULT_TIERS, 8, SimConfig(plan_interval_s=5.0))
        check_accounting(res)
        assert res.shed_reason or any(not _ok(res, i) for i in range(len(reqs))), f"{policy}: not overloaded"


def _ok(res: SimResult, i: int) -> bool:
    r = res.requests[i]
    tier = {t.name: t for t in DEFAULT_TIERS}[r.tier]
    tpot = (res.finish_s[i] - res.first_token_s[i]) / max(1, r.output_tokens - 1)
    return tier.met(res.first_token_s[i] - r.arrival_s, tpot)


def test_committed_scenarios_parse() -> None:
    root = Path(__file__).resolve().parents[2] / "bench" / "scenarios"
    if not (root.parents[2] / "shared" / "traces" / "servegen").is_dir():
        pytest.skip("the shared traces (../shared/traces) are not on this machine")
    files = sorted(root.glob("*.json"))
    assert len(files) >= 3
    for f in files:
        sc = load_scenario(str(f))
        assert sc.description and sc.extra.get("rationale"), f"{f.name}: needs a description and a rationale"


def test_sim_scenario_json_and_report(folder: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from router.cli import main

    doc = {"name": "tiny", "duration_s": 60, "sources": [
        {"type": "servegen", "folder": folder, "start_s": 0, "end_s": 600, "rate_scale": 0.2,
         "clients": [{"ids": [1], "tier": "interactive"}]},
        {"type": "bulk", "at_s": 10, "count": 50, "tier": "batch", "lengths": {"fixed": [3000, 100]}}]}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(doc))
    report = tmp_path / "report"
    assert main(["sim", "--scenario", str(path), "--policy", "static-colocated,dynamo-like", "--tp", "4",
                 "--sweep", "1,2", "--json", "--report", str(report)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = out["summary"]["policies"]
    assert set(rows) == {"static-colocated", "dynamo-like"} and out["scenario"] == "tiny"
    for row in rows.values():
        assert {"goodput", "slo_attainment", "capacity_rate_scale"} <= set(row) and 0 <= row["slo_attainment"] <= 1
    assert (report / "summary.md").exists() and (report / "goodput-over-time.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["sim", "--scenario", "/no/such.json"], "No such file"),
    (["sim", "--scenario", "x.json", "--trace", "x.csv"], "not allowed with"),
    (["sim", "--scenario", "x.json", "--sensitivity"], "give --report DIR"),
])
def test_scenario_user_errors_are_one_line(argv: list[str], message: str, capsys, tmp_path: Path,  # type: ignore[no-untyped-def]
                                           monkeypatch) -> None:
    from router.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.json").write_text(json.dumps({"sources": [{"type": "bulk", "at_s": 0, "count": 1, "tier": "batch",
                                                              "lengths": {"fixed": [1, 1]}}]}))
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors exit 2 with a usage line
        code = int(e.code or 0)
    assert code == 2
    assert message in capsys.readouterr().err
