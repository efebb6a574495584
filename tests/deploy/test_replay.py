"""`nitsum bench replay`: token counts fitted to the context, the trace window it sends, one-line
refusals, and a real replay of an Azure trace slice against `nitsum up` on the tiny model whose
summary agrees with the gateway's own request counters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.replay import ReplayConfig, fit_to_context, plan_requests
from bench.replay_summary import parse_gateway_counts
from services.cluster.redis_server import free_port
from services.tiers import DEFAULT_TIERS

from .conftest import python_m

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"
CONV, CODE = TRACES / "AzureLLMInferenceTrace_conv.csv", TRACES / "AzureLLMInferenceTrace_code.csv"


def test_token_counts_fit_the_context() -> None:
    assert fit_to_context(374, 44, 1.0, 512, 128) == (374, 44)
    assert fit_to_context(14050, 1000, 1.0, 512, 128) == (384, 128)  # output capped, prompt cut to fit
    assert fit_to_context(1020, 129, 0.1, 512, 128) == (102, 13)  # --token-scale first
    assert fit_to_context(2, 7, 0.01, 512, 128) == (1, 1)  # never zero tokens


def _trace(path: Path, rows: list[tuple[str, int, int]]) -> str:
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                    + "".join(f"2023-11-16 18:00:{t},{p},{o}\n" for t, p, o in rows))
    return str(path)


def test_the_window_rate_and_tiers_sent(tmp_path: Path) -> None:
    code = _trace(tmp_path / "x_code.csv", [(f"{s:02d}.0000000", 100, 10) for s in range(0, 40, 2)])
    conv = _trace(tmp_path / "x_conv.csv", [(f"{s:02d}.5000000", 2000, 900) for s in range(0, 40, 4)])
    config = ReplayConfig(traces=(code, conv), url="http://127.0.0.1:1", tiers=DEFAULT_TIERS,
                          tier_map="code=interactive,conv=batch", out_dir=tmp_path, rate_scale=2.0, start_s=10.0,
                          duration_s=5.0, max_requests=100)
    reqs = plan_requests(config)
    assert [r.arrival_s for r in reqs] == [0.0, 1.0, 1.25, 2.0, 3.0, 3.25, 4.0, 5.0]  # trace 10..20 s, x2
    assert {r.source: r.tier for r in reqs} == {"code": "interactive", "conv": "batch"}
    assert all(r.prompt_tokens + r.max_tokens <= 512 for r in reqs)
    few = plan_requests(ReplayConfig(**{**config.__dict__, "max_requests": 3}))
    assert len(few) == 3


@pytest.mark.parametrize("args, words", [
    (["--url", "http://10.1.2.3:8000"], "127.0.0.1"),
    (["--trace", "/nonexistent.csv"], "no such file"),
    (["--rate-scale", "0"], "rate-scale"),
    (["--tier-map", "conv=gold"], "unknown tier"),
])
def test_bad_arguments_exit_2_with_one_line(args: list[str], words: str, tmp_path: Path) -> None:
    trace = _trace(tmp_path / "t_conv.csv", [("00.0000000", 10, 10)])
    argv = ["--trace", trace, "--url", "http://127.0.0.1:9", "--duration", "1", *args]
    r = subprocess.run([*python_m("bench"), "replay", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nitsum bench replay: error:") and words in lines[0], lines


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except OSError as e:
        return getattr(e, "code", 0) or 0, ""


@pytest.fixture(scope="module")
def nitsum_up(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`nitsum up` (p1,d1) on the tiny model, as a user starts it; stopped by its pid."""
    if not CONV.is_file():
        pytest.skip(f"no Azure traces at {TRACES}")
    logs = tmp_path_factory.mktemp("replay-mesh")
    port = free_port("127.0.0.1")
    # --admin-port 0: a free one (the default, --port + 1, may be taken); the key keeps the
    # checkout's .nitsum/admin-key out of it.
    with open(logs / "up.out", "wb") as out:
        proc = subprocess.Popen([*python_m("up"), "--model", str(tiny_model_dir), "--port", str(port),
                                 "--admin-port", "0", "--log-dir", str(logs)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "NITSUM_ADMIN_KEY": "replay-test"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while _get(f"{url}/health")[0] != 200:
            assert proc.poll() is None, (logs / "up.out").read_text()[-2000:]
            assert time.monotonic() < deadline, "nitsum up was not healthy in 180 s"
            time.sleep(0.3)
        yield url
    finally:
        if proc.poll() is None:  # one that already exited has failed the test above; say why, not ESRCH
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def test_replay_of_an_azure_slice_writes_summary_and_plots_that_match_the_gateway(
        nitsum_up: str, tmp_path: Path) -> None:
    out = tmp_path / "replay"
    r = subprocess.run([*python_m("bench"), "replay", "--trace", f"{CONV},{CODE}", "--url", nitsum_up,
                        "--start", "260", "--rate-scale", "0.5", "--duration", "10", "--max-requests", "24", "--token-scale", "0.1",
                        "--context", "512", "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done" in r.stderr  # the progress line
    assert json.loads(r.stdout.strip().splitlines()[-1])["counts_match"] is True
    summary = json.loads((out / "summary.json").read_text())
    results = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert summary["sent"] == summary["planned"] == len(results) > 0
    assert set(summary["tiers"]) == {"interactive", "standard", "batch"}, "the slice has code and conv requests"
    assert summary["outcomes"] == {"ok": len(results)}
    for res in results:  # max_tokens + ignore_eos give each request the trace's (scaled) output length
        assert res["completion_tokens"] == res["max_tokens"] and res["prompt_tokens"] + res["max_tokens"] <= 512
    gateway = parse_gateway_counts(_get(f"{nitsum_up}/metrics")[1])  # this mesh served only the replay
    for tier, t in summary["tiers"].items():
        seen = {k: v for k, v in gateway[tier].items() if k != "goodput"}
        assert t["requests"] == sum(seen.values()) and t["ok"] == seen["ok"], (tier, t, seen)
        assert summary["gateway"]["goodput"][tier] == gateway[tier]["goodput"]
    for name in ("latency_cdf.png", "goodput.png", "plan.png", "overview.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
    assert summary["plan_changes"] and {g["role"] for g in summary["plan_changes"][0]["groups"]} == {"prefill", "decode"}
