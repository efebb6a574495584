"""A standard benchmark client against the gateway: NVIDIA's `aiperf` (what vLLM users run), with
its goodput SLOs, and its TTFT checked against the gateway's own metrics for the same requests.

    python -m bench.aiperf [--duration 60] [--concurrency 2] [--input-tokens 128] [--output-tokens 16]
                           [--model DIR] [--plan p1,d1] [--tier interactive] [--out out/aiperf]

1. `aiperf` (pinned, PyPI, no torch) goes into its own venv, `.nitsum/aiperf-venv`, once.
2. A mesh (`nitsum up`'s Mesh) starts on free ports, on the `small` preset by default: aiperf times
   a token when its chunk has text, and the tiny model's random tokens often decode to none at
   first (the gateway's first chunk then has empty content, which aiperf does not count), so there
   the two TTFTs measure different events; `small`'s prefill also outweighs the HTTP path's own
   milliseconds, which on a loaded 2-core host are tens of them.
3. `aiperf profile` streams chat requests at a fixed concurrency for `--duration` seconds (synthetic
   prompts, EOS ignored so every answer has `--output-tokens` tokens), all in one tier
   (`X-Nitsum-Tier`), with goodput SLOs set to that tier's TTFT and TPOT targets.
4. The gateway's `nitsum_ttft_seconds{tier}` histogram is read before and after: its p50 over just
   those requests, interpolated in the buckets as Prometheus's `histogram_quantile` does, is set
   against aiperf's TTFT p50 (target: within 20%). The gateway keeps no per-request record that
   aiperf's `X-Request-ID` could be matched with, so the check compares distributions; to tell
   bucket resolution from a real gap, aiperf's own per-request TTFTs are also put through the same
   buckets (`client_ttft_p50_bucketed_s`).

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from services.launch import LaunchConfig, Mesh
from services.tiers import DEFAULT_TIERS

AIPERF = "aiperf==0.13.0"
VENV = Path(".nitsum/aiperf-venv")
SMALL = Path(".nitsum/models/small")
_SAMPLE = re.compile(r'^nitsum_ttft_seconds_(bucket|sum|count)\{([^}]*)\} (\S+)$', re.M)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_aiperf(venv: Path = VENV) -> Path:
    """The aiperf command, installed into its own venv the first time (a second run installs nothing)."""
    exe = venv / "bin" / "aiperf"
    version = AIPERF.split("==")[1]
    if exe.is_file():
        done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
        if done.returncode == 0 and done.stdout.strip().endswith(version):
            return exe
    log(f"installing {AIPERF} into {venv} (once; about 1.2 GB)")
    if not (venv / "bin" / "python").is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", AIPERF], check=True)
    return exe


def checkpoint(model: Path | None) -> Path:
    """`model`, or the `small` preset (made once, as bench.mesh makes it)."""
    if model is not None:
        return model
    if not (SMALL / "config.json").is_file():
        from services.engine.make_model import make_model

        log(f"making the small preset in {SMALL} (once)")
        make_model(preset="small", out=SMALL, dtype="float32", seed=0)
    return SMALL


def ttft_histogram(url: str, tier: str) -> tuple[list[tuple[float, float]], float, float]:
    """The gateway's TTFT histogram of `tier`: cumulative (upper bound, count) ascending, sum, count."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    buckets, total, count = [], 0.0, 0.0
    for kind, labels, value in _SAMPLE.findall(text):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if pairs.get("tier") != tier:
            continue
        if kind == "bucket":
            buckets.append((math.inf if pairs["le"] == "+Inf" else float(pairs["le"]), float(value)))
        elif kind == "sum":
            total = float(value)
        else:
            count = float(value)
    return sorted(buckets), total, count


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """`histogram_quantile(q, ...)` of cumulative buckets, as Prometheus computes it."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return lower


def bucketed(values: list[float], bounds: list[float]) -> list[tuple[float, float]]:
    """Per-request values as cumulative buckets with these upper bounds."""
    return [(b, float(sum(v <= b for v in values))) for b in bounds]


def run_aiperf(exe: Path, mesh: Mesh, model: Path, args: argparse.Namespace, out: Path) -> None:
    tier = next(t for t in DEFAULT_TIERS if t.name == args.tier)
    argv = [str(exe), "profile", "--model", model.name,
            "--url", mesh.url, "--endpoint-type", "chat", "--streaming", "--tokenizer", str(model.resolve()),
            "--concurrency", str(args.concurrency), "--benchmark-duration", str(args.duration),
            "--benchmark-grace-period", "30",
            "--prompt-input-tokens-mean", str(args.input_tokens), "--prompt-input-tokens-stddev", "0",
            "--prompt-output-tokens-mean", str(args.output_tokens), "--prompt-output-tokens-stddev", "0",
            "--extra-inputs", "ignore_eos:true", "--header", f"X-Nitsum-Tier:{tier.name}",
            "--goodput", f"time_to_first_token:{tier.ttft_s * 1000:g} inter_token_latency:{tier.tpot_s * 1000:g}",
            "--random-seed", "0", "--ui-type", "none", "--no-gpu-telemetry", "--no-server-metrics",
            "--use-server-token-count", "--workers-max", "1", "--record-processor-service-count", "1",
            "--export-level", "records", "--output-artifact-dir", str(out)]
    log("running: " + " ".join(argv))
    subprocess.run(argv, check=True, stdout=sys.stderr, timeout=args.duration + 600)


def read_results(out: Path) -> tuple[dict[str, Any], list[float]]:
    """aiperf's summary (metric tag -> its stats) and each request's TTFT in seconds."""
    summary_path = next(out.rglob("*aiperf.json"))
    summary = json.loads(summary_path.read_text())
    metrics = summary.get("records", summary)
    per_request: list[float] = []
    for path in out.rglob("*.jsonl"):
        if path.name.endswith("_raw.jsonl"):
            continue
        for line in path.read_text().splitlines():
            m = json.loads(line).get("metrics", {}).get("time_to_first_token")
            if isinstance(m, dict) and m.get("value") is not None:
                per_request.append(float(m["value"]) * _to_seconds(m.get("unit", "ms")))
    return metrics, per_request


def _to_seconds(unit: str) -> float:
    return {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def stat(metrics: dict[str, Any], tag: str, key: str) -> float | None:
    m = metrics.get(tag)
    if not isinstance(m, dict) or m.get(key) is None:
        return None
    return float(m[key]) * (_to_seconds(m["unit"]) if m.get("unit") in ("ns", "us", "ms", "s") else 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.aiperf", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=60, help="seconds of load (default 60)")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--input-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the small preset)")
    p.add_argument("--plan", default="p1,d1")
    p.add_argument("--tier", default="interactive", choices=[t.name for t in DEFAULT_TIERS])
    p.add_argument("--out", type=Path, default=Path("out/aiperf"))
    args = p.parse_args(argv)
    exe = ensure_aiperf()
    model = checkpoint(args.model)
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    with Mesh(LaunchConfig(model=model, plan=args.plan, port=0, log_dir=out / "logs")) as mesh:
        log(f"mesh at {mesh.url}")
        before, sum0, n0 = ttft_histogram(mesh.url, args.tier)
        run_aiperf(exe, mesh, model, args, out / "aiperf")
        after, sum1, n1 = ttft_histogram(mesh.url, args.tier)
    delta = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    metrics, per_request = read_results(out / "aiperf")
    client_p50 = stat(metrics, "time_to_first_token", "p50")
    gateway_p50 = quantile(0.5, delta)
    ratio = client_p50 / gateway_p50 if client_p50 and gateway_p50 > 0 else math.nan
    result = {
        "client": "aiperf " + AIPERF.split("==")[1], "duration_s": args.duration, "concurrency": args.concurrency,
        "requests_client": len(per_request), "requests_gateway": int(delta[-1][1]) if delta else 0,
        "client_ttft_p50_s": client_p50, "gateway_ttft_p50_s": gateway_p50, "ratio": ratio,
        "within_20pct": bool(abs(ratio - 1) <= 0.2), "target": "client TTFT p50 within 20% of the gateway's",
        "client_ttft_p50_bucketed_s": quantile(0.5, bucketed(per_request, [le for le, _ in delta])),
        "client_ttft_mean_s": stat(metrics, "time_to_first_token", "avg"),
        "gateway_ttft_mean_s": (sum1 - sum0) / (n1 - n0) if n1 > n0 else math.nan,
        "client_ttfb_p50_s": stat(metrics, "http_req_waiting", "p50"),
        "client_ttft_p90_s": stat(metrics, "time_to_first_token", "p90"),
        "client_itl_p50_s": stat(metrics, "inter_token_latency", "p50"),
        "request_throughput_rps": stat(metrics, "request_throughput", "avg"),
        "goodput_rps": stat(metrics, "goodput", "avg"),
        "output_token_throughput": stat(metrics, "output_token_throughput", "avg"),
        "artifacts": str(out),
    }
    print(json.dumps(result))
    return 0 if result["within_20pct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
