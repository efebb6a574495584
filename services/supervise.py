"""Child processes that are restarted when they die: what `nitsum up` runs its mesh with.

A child that exits while the mesh runs is started again with the same command after a backoff
(`RestartPolicy.backoff_s`, doubling up to `max_backoff_s`); one that dies `max_restarts` times
within `window_s` is given up on (logged loudly; the rest of the mesh keeps serving without it),
and so is one that exits with status 2, the commands' status for a usage or configuration error,
which no restart fixes (systemd's RestartPreventExitStatus).
Every restart is logged to stderr and handed to `on_restart` (which counts it in Redis, so the
gateway's /metrics shows `nitsum_process_restarts_total{process}`). The mesh heals around the
gap: a standby router takes the lead, the orchestrator re-plans around a dead slot and brings it
back into the plan when it returns, requests on a dead group are resumed on another one.

Lifecycle of a child: start -> running -> exited (seen by `poll`) -> waiting out its backoff ->
start again ... -> stopped by `stop_all` (SIGTERM, then SIGKILL after a timeout), newest first.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("nitsum.up")
USAGE_ERROR = 2  # services/cliutil.py `fail`


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    max_restarts: int = 5
    window_s: float = 120.0


@dataclass
class Child:
    name: str
    start: Callable[[], subprocess.Popen[bytes]]
    proc: subprocess.Popen[bytes] | None = None
    deaths: list[float] = field(default_factory=list)  # monotonic times it was seen dead
    restart_at: float | None = None
    given_up: bool = False
    restarts: int = 0
    last_status: int | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    def __init__(self, policy: RestartPolicy | None = None,
                 on_restart: Callable[[str, int | None], None] | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self.on_restart = on_restart
        self.children: list[Child] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, start: Callable[[], subprocess.Popen[bytes]],
            running: subprocess.Popen[bytes] | None = None) -> Child:
        """Start a child (or adopt `running`, started already by `start`'s means)."""
        child = Child(name, start)
        child.proc = running or start()
        with self._lock:
            self.children.append(child)
        return child

    def get(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def dead(self) -> list[tuple[str, int]]:
        """Children not running now (restarting or given up), with their last exit status."""
        return [(c.name, c.proc.returncode if c.proc else -1) for c in self.children if not c.alive]

    def watch(self, period_s: float = 0.2) -> None:
        """Restart children from a background thread until `stop_all`."""
        self._thread = threading.Thread(target=self._watch, args=(period_s,), name="nitsum-supervisor", daemon=True)
        self._thread.start()

    def _watch(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            self.poll()

    def poll(self) -> None:
        now = time.monotonic()
        with self._lock:
            for c in self.children:
                if self._stop.is_set():
                    return
                if c.given_up or c.alive:
                    continue
                if c.restart_at is None:
                    self._died(c, now)
                elif now >= c.restart_at:
                    c.restart_at = None
                    try:
                        c.proc = c.start()
                    except Exception as e:
                        log.error("nitsum up: could not restart %s: %s", c.name, e)
                        self._died(c, now)
                        continue
                    c.restarts += 1
                    log.warning("nitsum up: restarted %s (restart %d)", c.name, c.restarts)
                    self._count(c)

    def _died(self, c: Child, now: float) -> None:
        p = self.policy
        rc = c.proc.returncode if c.proc is not None else None
        c.deaths = [t for t in c.deaths if now - t < p.window_s] + [now]
        c.last_status = rc
        if rc == USAGE_ERROR:
            c.given_up = True
            log.error("nitsum up: %s exited with status 2 (a usage or configuration error); not restarting it", c.name)
            return
        if len(c.deaths) > p.max_restarts:
            c.given_up = True
            log.error("nitsum up: %s exited with status %s, %d times within %.0fs; not restarting it again",
                      c.name, rc, len(c.deaths), p.window_s)
            return
        delay = min(p.max_backoff_s, p.backoff_s * 2 ** (len(c.deaths) - 1))
        c.restart_at = now + delay
        log.warning("nitsum up: %s exited with status %s; restarting it in %.1fs", c.name, rc, delay)

    def _count(self, c: Child) -> None:
        if self.on_restart is not None:
            try:
                self.on_restart(c.name, c.last_status)
            except Exception as e:  # counting must never stop a restart
                log.warning("nitsum up: could not count the restart of %s: %s", c.name, e)

    def stop_all(self, timeout_s: float = 10.0, last: tuple[str, ...] = ()) -> None:
        """SIGTERM every running child (newest first), wait, SIGKILL what is left; the children
        named in `last` only once the others are gone (Redis: the others write to it on their way out)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            children = list(reversed(self.children))
            self.children.clear()
        first = [c.proc for c in children if c.proc is not None and c.name not in last]
        stop_processes(first, timeout_s)
        stop_processes([c.proc for c in children if c.proc is not None and c.name in last], timeout_s)


def _linux_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _linux_prctl()
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for a child that must not outlive the process that started it (Linux: the
    kernel sends it SIGKILL when the starting thread exits, even by SIGKILL), so a `nitsum up` or
    a test killed hard leaves no mesh behind. SIGKILL, not SIGTERM: a slot blocked in a collective
    whose peer is gone never runs a Python signal handler. An orderly stop still goes through
    `stop_processes` (SIGTERM first). Elsewhere: nothing."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """SIGTERM each (in order), wait for all until `timeout_s`, SIGKILL the rest; by pid."""
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


def log_path(log_dir: Path, name: str) -> Path:
    return log_dir / f"{name}.log"
