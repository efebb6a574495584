"""A real Prometheus (Debian's `prometheus`, deploy/observe.py) scraping a running mesh with the jobs
of deploy/prometheus.yml, after a short load with two re-cuts: every query of the Grafana dashboard,
as Grafana would send it (deploy/dashboard.py), returns data through Prometheus's HTTP API, at least
one series with a finite value. Skipped only where Prometheus cannot be installed (no apt-get)."""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from deploy.dashboard import Query, dashboard_queries, expand, variables
from deploy.observe import Prometheus, PrometheusUnavailable, ensure_prometheus, mesh_targets
from services.launch import LaunchConfig, Mesh

LOAD_S = 14.0
SCRAPE_S = 1.0


@dataclass(frozen=True)
class Observed:
    prom: Prometheus
    at: float  # when the queries are evaluated
    window_s: int  # $__rate_interval and $__range: the whole load


def _apply(mesh: Mesh, plan: str) -> dict:
    req = urllib.request.Request(f"{mesh.admin_url}/admin/plan", method="POST", data=json.dumps({"plan": plan}).encode(),
                                 headers={"Authorization": f"Bearer {mesh.admin_key}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


async def _load(mesh: Mesh, seconds: float) -> None:
    """Requests in every tier, whole and streamed, a stream its client leaves (an abort), and two
    re-cuts (p1,d1 -> d1,p1 -> p1,d1) while they run."""
    client = openai.AsyncOpenAI(base_url=f"{mesh.url}/v1", api_key="unused", max_retries=0, timeout=60)
    stop = time.monotonic() + seconds

    async def worker(w: int) -> None:
        i = 0
        while time.monotonic() < stop:
            tier = ("interactive", "standard", "batch")[(i + w) % 3]
            if i % 4 == 0:
                stream = await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"w{w} {i}"}], max_tokens=12, stream=True,
                    extra_headers={"X-Nitsum-Tier": tier})
                async for _ in stream:
                    pass
            else:
                await client.completions.create(model="tiny", prompt=f"worker {w} item {i}", max_tokens=10,
                                                extra_headers={"X-Nitsum-Tier": tier})
            i += 1

    async def leaver() -> None:
        while time.monotonic() < stop:
            stream = await client.completions.create(model="tiny", prompt="go on", max_tokens=200, stream=True,
                                                     extra_body={"ignore_eos": True})
            async for _ in stream:
                break
            await stream.close()
            await asyncio.sleep(1.0)

    async def recut() -> None:
        for plan in ("d1,p1", "p1,d1"):
            await asyncio.sleep(seconds / 3)
            assert (await asyncio.to_thread(_apply, mesh, plan))["result"] == "committed"

    await asyncio.gather(*(worker(w) for w in range(4)), leaver(), recut())
    await client.close()


@pytest.fixture(scope="module")
def observed(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    try:
        ensure_prometheus()
    except PrometheusUnavailable as e:
        pytest.skip(f"no Prometheus server here: {e}")
    root = tmp_path_factory.mktemp("observe")
    # The autopilot runs (its panels need data) but holds the plan: the re-cuts here are the admin's.
    mesh = Mesh(LaunchConfig(model=tiny_model_dir, plan="p1,d1", port=0, log_dir=root / "logs", startup_timeout_s=120,
                             autopilot=True, autopilot_interval_s=1.0, autopilot_hold_s=3600.0))
    with mesh, Prometheus(mesh_targets(mesh), data_dir=root / "prometheus", scrape_interval_s=SCRAPE_S) as prom:
        prom.wait_for_targets()
        started = time.time()
        asyncio.run(_load(mesh, LOAD_S))
        time.sleep(3 * SCRAPE_S)  # the last of the load scraped
        at = time.time()
        yield Observed(prom, at, math.ceil(at - started) + 2)


def _params() -> list[object]:
    return [pytest.param(q, id=q.where) for q in dashboard_queries()]


@pytest.mark.parametrize("query", _params())
def test_every_dashboard_query_has_data(observed: Observed, query: Query) -> None:
    expr = expand(query.expr, observed.window_s, int(SCRAPE_S), observed.window_s, variables())
    result = observed.prom.query(expr, observed.at)
    values = [float(r["value"][1]) for r in result]
    assert any(math.isfinite(v) for v in values), f"{query.where}: {expr}\n  -> {result}"


def test_prometheus_scrapes_every_job_of_the_deploy_config(observed: Observed) -> None:
    targets = observed.prom.api("targets")["activeTargets"]
    up = {(t["labels"]["job"], t["health"]) for t in targets}
    assert up == {("gateway", "up"), ("router", "up"), ("slots", "up"), ("prometheus", "up")}, up
    assert sum(t["labels"]["job"] == "slots" for t in targets) == 2
