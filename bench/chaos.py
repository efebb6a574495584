"""Chaos benchmark: the faults a running mesh meets, one after another, under a steady two-tier load.

    python -m bench.chaos [--model DIR] [--plan p1,d1,d1] [--interactive-rate 3] [--batch-rate 2]
                          [--settle 4] [--out FILE]

It starts its own mesh (`nitsum up`'s Mesh, supervised, on the tiny model unless --model), keeps
sending interactive requests (streamed) and batch requests (whole) through the official `openai`
client at fixed rates, all greedy with EOS ignored and `return_token_ids`, so every answer can be
checked token by token against the engine's own output for the same prompt. Then, each once the
mesh is back to full service, it makes these faults happen:

  hostile-request   a request with temperature 1e-40 (it once crashed a prefill group)
  decode-kill       SIGKILL the decode slot holding the most requests
  prefill-kill      SIGKILL the prefill slot
  decode-hang       SIGSTOP a decode slot for 6 s (past its lease), then SIGCONT
  router-kill       SIGKILL the leading router (a standby takes over)
  redis-kill        SIGKILL Redis (`nitsum up` starts it again on its append-only file)
  overload          a burst of batch requests past the tier's queue limit (they must get 429)

Per fault (requests attributed to the fault that was last made when they were sent): requests
sent, completed, errored with a clear error (an OpenAI-shaped HTTP error or SSE error event),
lost (no answer and no clear error: a hang past 120 s, a cut stream), tokens duplicated and
missing against the engine's output, 5xx answers, and seconds from the fault to full service
(every process up, every group of the plan serving, /health ready, a request answered).
Progress goes to stderr; the last stdout line is one JSON object with `lost_requests` (target 0),
`duplicated_tokens` (0), `server_errors_5xx` (0) and `recovery_s_max` (target <= 10).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from services.launch import LaunchConfig, Mesh

MAX_TOKENS = {"interactive": 24, "batch": 64}
BATCH_QUEUE_LIMIT = 16


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Outcome:
    tier: str
    phase: str
    status: str = "lost"  # ok | clear_error | lost
    http_status: int = 200
    ids: list[int] = field(default_factory=list)
    prompt: int = 0


@dataclass
class Phase:
    name: str
    started: float
    recovery_s: float = 0.0


class Load:
    """Two tiers of requests at fixed rates, each checked against the engine's greedy output."""

    def __init__(self, mesh: Mesh, prompts: list[list[int]], rates: dict[str, float]) -> None:
        self.mesh, self.prompts, self.rates = mesh, prompts, rates
        self.outcomes: list[Outcome] = []
        self.phase = "warm-up"
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(64)
        self._futures: list[Future[None]] = []
        self._threads = [threading.Thread(target=self._send_loop, args=(tier,), daemon=True) for tier in rates]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def keep(self, future: Future[None]) -> None:
        """Wait for this too when the load stops."""
        self._futures.append(future)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        for f in self._futures:
            f.result()
        self._pool.shutdown()

    def _send_loop(self, tier: str) -> None:
        n, period = 0, 1.0 / self.rates[tier]
        next_at = time.monotonic()
        while not self._stop.is_set():
            outcome = Outcome(tier, self.phase, prompt=n % len(self.prompts))
            self.outcomes.append(outcome)
            self._futures.append(self._pool.submit(self.one, outcome))
            n += 1
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def one(self, o: Outcome) -> None:
        body = {"model": _model_name(self.mesh), "prompt": self.prompts[o.prompt], "max_tokens": MAX_TOKENS[o.tier], "temperature": 0,
                "ignore_eos": True, "return_token_ids": True, "stream": o.tier == "interactive"}
        headers = {"X-Nitsum-Tier": o.tier}
        try:
            with httpx.stream("POST", f"{self.mesh.url}/v1/completions", json=body, headers=headers,
                              timeout=httpx.Timeout(120.0)) as r:
                o.http_status = r.status_code
                if r.status_code != 200:
                    r.read()
                    o.status = "clear_error" if r.json().get("error") else "lost"
                    return
                if o.tier == "interactive":
                    self._read_stream(r, o)
                else:
                    r.read()
                    o.ids = json.loads(r.content)["choices"][0]["token_ids"]
                    o.status = "ok"
        except (httpx.HTTPError, ValueError, KeyError):
            o.status = "lost"  # a transport error, a cut stream, or a hang past the timeout

    @staticmethod
    def _read_stream(r: httpx.Response, o: Outcome) -> None:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                o.status = "ok" if o.status != "clear_error" else o.status
                return
            doc = json.loads(line[6:])
            if "error" in doc:
                o.status = "clear_error"
                o.http_status = 500 if doc["error"].get("type") == "server_error" else 503
                continue
            if doc.get("choices"):
                o.ids.extend(doc["choices"][0].get("token_ids", []))
        o.status = "lost"  # the stream ended without [DONE]


def threading_future(fn: Callable[[], None]) -> Future[None]:
    """Run `fn` on its own thread; the future completes with it."""
    future: Future[None] = Future()

    def body() -> None:
        try:
            fn()
            future.set_result(None)
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=body, daemon=True).start()
    return future


def full_service(mesh: Mesh, plan_groups: int, timeout_s: float = 120.0) -> float:
    """Seconds until every process runs, the plan's groups all serve, and a request is answered."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if not mesh.dead() and _serving_groups(mesh) == plan_groups and _answers(mesh):
                return time.monotonic() - started
        except (OSError, httpx.HTTPError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the mesh did not come back to full service within {timeout_s:.0f}s")


def _serving_groups(mesh: Mesh) -> int:
    r = httpx.get(f"{mesh.admin_url}/admin/plan", headers={"Authorization": f"Bearer {mesh.admin_key}"}, timeout=5)
    health = httpx.get(f"{mesh.url}/health", timeout=5)
    return len(r.json()["groups"]) if r.status_code == 200 and health.status_code == 200 else -1


def _answers(mesh: Mesh) -> bool:
    r = httpx.post(f"{mesh.url}/v1/completions", json={"model": _model_name(mesh), "prompt": [1, 2, 3],
                                                       "max_tokens": 2}, headers={"X-Nitsum-Tier": "interactive"},
                   timeout=10)
    return r.status_code == 200


def _model_name(mesh: Mesh) -> str:
    return mesh.config.model.name if mesh.config.model is not None else "tiny"


def faults(mesh: Mesh, load: Load) -> list[tuple[str, Callable[[], None]]]:
    def kill(name: str) -> Callable[[], None]:
        return lambda: os.kill(mesh.pid(name), signal.SIGKILL)

    def busiest_decode() -> str:
        import redis

        r = redis.Redis.from_url(mesh.redis_url, decode_responses=True)
        raw: dict[str, str] = r.hgetall(f"{mesh.config.redis_prefix}holders")  # type: ignore[assignment]
        r.close()
        held = [v.partition(" ")[2] for v in raw.values()]  # "<attempt> <group>"
        decode = [h for h in held if h.startswith("d")] or ["d1-e1"]
        group = max(set(decode), key=decode.count)
        return f"slot{group[1:].split('-')[0]}"

    def hang() -> None:
        pid = mesh.pid("slot2")
        os.kill(pid, signal.SIGSTOP)
        time.sleep(6.0)
        os.kill(pid, signal.SIGCONT)

    def leader() -> None:
        import redis

        r = redis.Redis.from_url(mesh.redis_url, decode_responses=True)
        leading: Any = r.get(f"{mesh.config.redis_prefix}router:leader")
        r.close()
        os.kill(int(leading.rsplit("-", 1)[1]), signal.SIGKILL)  # router ids are "<host>-<pid>"

    def hostile() -> None:
        httpx.post(f"{mesh.url}/v1/completions", timeout=60,
                   json={"model": _model_name(mesh), "prompt": "hi", "max_tokens": 4, "temperature": 1e-40})

    def overload() -> None:  # the burst goes on while recovery is timed: interactive requests still answered
        burst = [Outcome("batch", load.phase, prompt=i % len(load.prompts)) for i in range(8 * BATCH_QUEUE_LIMIT)]
        load.outcomes.extend(burst)
        def send() -> None:
            with ThreadPoolExecutor(len(burst)) as pool:
                list(pool.map(load.one, burst))

        load.keep(threading_future(send))
        time.sleep(0.5)

    return [("hostile-request", hostile), ("decode-kill", lambda: kill(busiest_decode())()),
            ("prefill-kill", kill("slot0")), ("decode-hang", hang), ("router-kill", leader),
            ("redis-kill", kill("redis")), ("overload", overload)]


def summarize(outcomes: list[Outcome], want: list[list[int]], phases: list[Phase]) -> dict[str, Any]:
    rows: dict[str, dict[str, float]] = {p.name: {"sent": 0, "completed": 0, "clear_errors": 0, "lost": 0,
                                                  "duplicated_tokens": 0, "missing_tokens": 0, "server_errors_5xx": 0,
                                                  "shed_429": 0, "recovery_s": round(p.recovery_s, 2)}
                                         for p in phases}
    for o in outcomes:
        row = rows[o.phase]
        row["sent"] += 1
        row["completed"] += o.status == "ok"
        row["clear_errors"] += o.status == "clear_error"
        row["lost"] += o.status == "lost"
        row["server_errors_5xx"] += o.http_status >= 500
        row["shed_429"] += o.http_status == 429
        if o.status == "ok":
            expected = want[o.prompt][:MAX_TOKENS[o.tier]]
            for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=expected, b=o.ids, autojunk=False).get_opcodes():
                row["duplicated_tokens"] += (j2 - j1) if tag in ("insert", "replace") else 0
                row["missing_tokens"] += (i2 - i1) if tag in ("delete", "replace") else 0
    total = {k: sum(r[k] for r in rows.values()) for k in ("sent", "completed", "clear_errors", "lost",
                                                          "duplicated_tokens", "missing_tokens", "server_errors_5xx")}
    faulted = [p for p in phases if p.name != "warm-up"]
    return {"phases": rows, "lost_requests": total["lost"], "duplicated_tokens": total["duplicated_tokens"],
            "missing_tokens": total["missing_tokens"], "server_errors_5xx": total["server_errors_5xx"],
            "requests": total["sent"], "completed": total["completed"], "clear_errors": total["clear_errors"],
            "recovery_s_max": round(max((p.recovery_s for p in faulted), default=0.0), 2)}


def _reference(model: Path, prompts: list[list[int]]) -> list[list[int]]:
    from services.engine import EngineArgs, LLMEngine, SamplingParams

    engine = LLMEngine(EngineArgs(model=str(model)))
    out = engine.generate(prompts, SamplingParams(max_tokens=max(MAX_TOKENS.values()), temperature=0.0,
                                                  ignore_eos=True))
    engine.shutdown()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.launch import ensure_model

    model = ensure_model(Path(args.model) if args.model else Path("tiny"))
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 40))] for _ in range(16)]
    want = _reference(model, prompts)
    tiers = Path(args.workdir) / "tiers.json"
    tiers.parent.mkdir(parents=True, exist_ok=True)
    tiers.write_text(json.dumps({"tiers": [
        {"name": "interactive", "ttft_s": 0.5, "tpot_s": 0.05, "weight": 4, "queue_limit": 128, "max_wait_s": 5},
        {"name": "batch", "ttft_s": 30, "tpot_s": 0.5, "weight": 1, "queue_limit": BATCH_QUEUE_LIMIT,
         "max_wait_s": 600}], "default_tier": "batch"}))
    groups = len(args.plan.split(","))
    config = LaunchConfig(model=model, plan=args.plan, port=0, tiers=tiers, log_dir=Path(args.workdir) / "logs",
                          startup_timeout_s=180)
    with Mesh(config) as mesh:
        full_service(mesh, groups)
        load = Load(mesh, prompts, {"interactive": args.interactive_rate, "batch": args.batch_rate})
        phases = [Phase("warm-up", time.monotonic())]
        load.start()
        time.sleep(args.settle)
        for name, make_fault in faults(mesh, load):
            _log(f"chaos: {name}")
            phase = Phase(name, time.monotonic())
            phases.append(phase)
            load.phase = name
            make_fault()
            phase.recovery_s = time.monotonic() - phase.started + full_service(mesh, groups)
            _log(f"chaos: {name}: back to full service after {phase.recovery_s:.1f}s")
            time.sleep(args.settle)
        load.stop()
        restarts = {n: mesh.restarts(n) for n, _ in mesh.procs}
    result = summarize(load.outcomes, want, phases)
    result["restarts"] = {n: k for n, k in restarts.items() if k}
    result["plan"], result["model"] = args.plan, model.name
    return result


def _table(result: dict[str, Any]) -> str:
    cols = ("sent", "completed", "clear_errors", "lost", "duplicated_tokens", "missing_tokens",
            "server_errors_5xx", "shed_429", "recovery_s")
    lines = ["| fault | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in result["phases"].items():
        lines.append(f"| {name} | " + " | ".join(str(int(row[c]) if c != "recovery_s" else row[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the tiny demo model)")
    p.add_argument("--plan", default="p1,d1,d1", help="needs a prefill group on slot 0 and a decode group on slot 2")
    p.add_argument("--interactive-rate", type=float, default=3.0, help="interactive requests per second")
    p.add_argument("--batch-rate", type=float, default=2.0, help="batch requests per second")
    p.add_argument("--settle", type=float, default=4.0, help="seconds of steady load before and after each fault")
    p.add_argument("--workdir", default=".nitsum/bench-chaos", help="where the mesh's logs and tiers file go")
    p.add_argument("--out", default=None, help="also write the result JSON here")
    args = p.parse_args(argv)
    result = run(args)
    _log(_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
