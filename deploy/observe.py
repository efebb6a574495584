"""A real Prometheus over a local mesh: Debian's `prometheus` server on a free port with its own data
folder, scraping a running `nitsum up` with a config made from deploy/prometheus.yml (the same jobs,
their targets rewritten to this host's ports).

    python -m deploy.observe                                  # the running `nitsum up` (.nitsum/up.json)
    python -m deploy.observe --gateway-port 9000 --admin-port 9001 --slot-metrics 127.0.0.1:9100 --port 9090
    python -m deploy.observe --up                             # start a mesh too (tiny model)

Jobs: `gateway` (its /metrics on its port), `router` (the leading router's /metrics on the admin
port), `slots` (each slot's /metrics: `nitsum up` gives every slot a port of its own and writes
them, with the others, to .nitsum/up.json while it runs), `prometheus`. Without that file (a mesh
started otherwise) the ports come from the flags.
The server is installed with `apt-get install -y prometheus` when missing (root only).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.cluster.redis_server import free_port
from services.launch import UP_FILE, LaunchConfig, Mesh

DEPLOY = Path(__file__).resolve().parent
PROMETHEUS = "/usr/bin/prometheus"


class PrometheusUnavailable(RuntimeError):
    """No prometheus binary, and apt-get cannot install one here."""


def ensure_prometheus() -> str:
    """The path of the prometheus server, installed from Debian's packages if need be."""
    found = shutil.which("prometheus") or (PROMETHEUS if Path(PROMETHEUS).is_file() else None)
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise PrometheusUnavailable("no prometheus binary and no apt-get to install one (Debian's `prometheus`)")
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    install = [apt, "install", "-y", "-q", "prometheus"]
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:  # the package lists may be missing or stale: fetch them once
        subprocess.run([apt, "update", "-q"], capture_output=True, text=True, env=env, timeout=600)
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0 or not Path(PROMETHEUS).is_file():
        raise PrometheusUnavailable(f"`apt-get install -y prometheus` failed: {done.stderr.strip()[-500:]}")
    return PROMETHEUS


@dataclass(frozen=True)
class Targets:
    """host:port of every /metrics to scrape, by job of deploy/prometheus.yml."""

    gateway: tuple[str, ...]
    router: tuple[str, ...]
    slots: tuple[str, ...] = ()


def render_config(targets: Targets, self_address: str, scrape_interval_s: float,
                  template: Path = DEPLOY / "prometheus.yml") -> str:
    """deploy/prometheus.yml with its jobs' targets replaced by these (the job names and paths kept)."""
    doc: dict[str, Any] = yaml.safe_load(template.read_text())
    interval = f"{scrape_interval_s:g}s"
    doc["global"] = {**doc.get("global", {}), "scrape_interval": interval, "evaluation_interval": interval}
    by_job = {"gateway": targets.gateway, "router": targets.router, "slots": targets.slots,
              "prometheus": (self_address,)}
    for job in doc["scrape_configs"]:
        if job["job_name"] not in by_job:
            raise ValueError(f"deploy/prometheus.yml has job {job['job_name']!r}, which this mesh has no targets for")
        job["static_configs"] = [{"targets": list(by_job[job["job_name"]])}]
    return yaml.safe_dump(doc, sort_keys=False)


@dataclass
class Prometheus:
    """One prometheus server process; `start()` then `stop()` (also a context manager)."""

    targets: Targets
    port: int = 0  # 0: a free one
    data_dir: Path | None = None  # None: a temporary folder, removed at stop
    scrape_interval_s: float = 1.0
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> Prometheus:
        binary = ensure_prometheus()
        self.port = self.port or free_port(self.host)
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="nitsum-prometheus-")
            self.data_dir = Path(self._tmp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "prometheus.yml"
        config.write_text(render_config(self.targets, f"{self.host}:{self.port}", self.scrape_interval_s))
        log = (self.data_dir / "prometheus.log").open("ab")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.data_dir / 'data'}",
             f"--web.listen-address={self.host}:{self.port}", "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = (self.data_dir / "prometheus.log").read_text(errors="replace")[-1500:]
                self.stop()
                raise RuntimeError(f"prometheus did not become ready on {self.url}:\n{tail}")
            time.sleep(0.2)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; its `data` (raises on an error answer)."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
            doc = json.loads(r.read())
        if doc.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {doc}")
        return doc["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result vector (or a one-element list for a scalar)."""
        data = self.api("query", query=expr, **({"time": f"{at:.3f}"} if at is not None else {}))
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]

    def targets_up(self) -> dict[str, bool]:
        """scrape URL -> whether its last scrape worked."""
        return {t["scrapeUrl"]: t["health"] == "up" for t in self.api("targets")["activeTargets"]}

    def wait_for_targets(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            up = self.targets_up()
            if up and all(up.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus targets not all up after {timeout_s:.0f}s: {up}")
            time.sleep(0.5)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mesh_targets(mesh: Mesh) -> Targets:
    return Targets(gateway=(f"{mesh.config.host}:{mesh.port}",), router=(f"{mesh.config.host}:{mesh.admin_port}",),
                   slots=tuple(f"{mesh.config.host}:{p}" for _, p in sorted(mesh.slot_metrics.items())))


def up_targets(path: Path = UP_FILE) -> Targets | None:
    """The running `nitsum up`'s targets, from the file it writes (None: no such file)."""
    try:
        doc = json.loads(path.read_text())
        return Targets((doc["gateway_metrics"],), (doc["router_metrics"],), tuple(doc["slot_metrics"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.observe", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--gateway-port", type=int, default=None,
                   help="the gateway's port (`nitsum up --port`; default: from .nitsum/up.json, else 8000)")
    p.add_argument("--admin-port", type=int, default=None, help="the router's admin port (default: gateway port + 1)")
    p.add_argument("--slot-metrics", default="", help="host:port,... of slots that serve /metrics")
    p.add_argument("--port", type=int, default=9090, help="Prometheus's port (0: a free one)")
    p.add_argument("--data-dir", type=Path, default=Path(".nitsum/prometheus"))
    p.add_argument("--scrape-interval", type=float, default=5.0, help="seconds (deploy/prometheus.yml: 5)")
    p.add_argument("--up", action="store_true", help="also start a mesh (`nitsum up`, tiny model) whose slots serve /metrics")
    p.add_argument("--plan", default="p1,d1", help="with --up: the plan")
    args = p.parse_args(argv)
    mesh: Mesh | None = None
    flags = args.gateway_port is not None or args.admin_port is not None or bool(args.slot_metrics)
    try:
        if args.up:
            mesh = Mesh(LaunchConfig(model=Path("tiny"), plan=args.plan, host=args.host, port=args.gateway_port or 8000))
            mesh.start()
            targets = mesh_targets(mesh)
            print(f"nitsum is serving at {mesh.url}/v1", flush=True)
        elif not flags and (found := up_targets()) is not None:
            targets = found
        else:
            gateway = args.gateway_port or 8000
            admin = args.admin_port or gateway + 1
            targets = Targets((f"{args.host}:{gateway}",), (f"{args.host}:{admin}",),
                              tuple(t for t in args.slot_metrics.split(",") if t))
        with Prometheus(targets, args.port, args.data_dir, args.scrape_interval, args.host) as prom:
            print(f"prometheus is at {prom.url} (targets: {prom.url}/targets); Ctrl-C stops it", flush=True)
            while prom.process is not None and prom.process.poll() is None:
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    except PrometheusUnavailable as e:
        print(f"observe: {e}")
        return 2
    finally:
        if mesh is not None:
            mesh.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
