"""Rank processes for the transfer tests: each owns one cache tensor and one agent, and is driven
from the test through typed messages on queues.

A worker: builds its agent and sends `Ready` (with its metadata); takes `Run` (transfers to start)
and `Peers` (metadata to load) in either order, polling its transfers meanwhile; sends `Started`
once every send is past BOOTSTRAPPING, `Outcome` once all are finished; closes its agent on `Stop`
and answers `Closed`.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import torch

from kvtransfer.agent import make_agent
from kvtransfer.agent_base import BlockTransfer
from kvtransfer.state import TransferState


@dataclass(frozen=True)
class RankSpec:
    name: str
    backend: str
    cache: torch.Tensor | None = None  # initial contents; None = `shape` of zeros
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.bfloat16


@dataclass(frozen=True)
class SendOrder:
    peer: str
    transfer_id: str
    descs: np.ndarray


@dataclass(frozen=True)
class Run:
    sends: list[SendOrder] = field(default_factory=list)
    receives: list[str] = field(default_factory=list)
    timeout_s: float = 20.0
    return_cache: bool = False
    cancel_when_started: bool = False


@dataclass(frozen=True)
class Peers:
    metadata: list[bytes]


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Ready:
    name: str
    metadata: bytes


@dataclass(frozen=True)
class Started:
    name: str


@dataclass(frozen=True)
class Outcome:
    name: str
    first_states: dict[str, str]
    states: dict[str, str]
    errors: dict[str, str]
    open_transfers: int
    peers: list[str]
    cache: torch.Tensor | None


@dataclass(frozen=True)
class Closed:
    name: str


def worker_main(spec: RankSpec, commands: Any, events: Any) -> None:
    torch.set_num_threads(1)
    cache = spec.cache.clone() if spec.cache is not None else torch.zeros(spec.shape, dtype=spec.dtype)
    agent = make_agent(spec.backend, spec.name, cache)  # type: ignore[arg-type]
    events.put(Ready(spec.name, agent.metadata()))
    transfers: dict[str, BlockTransfer] = {}
    first: dict[str, str] = {}
    run: Run | None = None
    started = False
    while True:
        try:
            cmd = commands.get(timeout=0.001)
        except queue.Empty:
            cmd = None
        if isinstance(cmd, Peers):
            for md in cmd.metadata:
                agent.add_peer(md)
        elif isinstance(cmd, Run):
            run = cmd
            for s in cmd.sends:
                transfers[s.transfer_id] = agent.send(s.peer, s.descs, s.transfer_id, cmd.timeout_s)
            for tid in cmd.receives:
                transfers[tid] = agent.receive(tid, cmd.timeout_s)
        elif isinstance(cmd, Stop):
            agent.close()
            events.put(Closed(spec.name))
            return
        agent.progress()  # as the engine's step loop would
        states = {tid: t.poll() for tid, t in transfers.items()}
        for tid, st in states.items():
            first.setdefault(tid, st.value)
        if run is not None and not started and all(s is not TransferState.BOOTSTRAPPING for s in states.values()):
            started = True
            events.put(Started(spec.name))
            if run.cancel_when_started:
                for t in transfers.values():
                    t.cancel()
                states = {tid: t.poll() for tid, t in transfers.items()}
        if run is not None and all(s.finished for s in states.values()):
            events.put(Outcome(spec.name, first, {k: v.value for k, v in states.items()},
                               {k: t.error for k, t in transfers.items() if t.error},
                               agent.open_transfers, sorted(agent.peers),
                               cache.clone() if run.return_cache else None))
            run, transfers = None, {}


class Ranks:
    """A set of running rank processes; every one is stopped by its pid on exit."""

    def __init__(self, specs: list[RankSpec]) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "numpy", "kvtransfer.nixl_backend", "tests.kvtransfer.rankproc"])
        self.events: Any = ctx.Queue()
        self.commands: dict[str, Any] = {s.name: ctx.Queue() for s in specs}
        self.procs: dict[str, BaseProcess] = {}
        for s in specs:
            p = ctx.Process(target=worker_main, args=(s, self.commands[s.name], self.events), daemon=True)
            p.start()
            self.procs[s.name] = p
        self.metadata: dict[str, bytes] = {}

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        self.metadata = {r.name: r.metadata for r in self.collect(Ready, list(self.procs), timeout_s)}

    def collect(self, kind: type, names: list[str], timeout_s: float) -> list[Any]:
        got: dict[str, Any] = {}
        deadline = time.monotonic() + timeout_s
        while set(got) != set(names):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {kind.__name__} from {sorted(set(names) - set(got))}")
            try:
                ev = self.events.get(timeout=0.2)
            except queue.Empty:  # nothing pending: a rank that is gone will never answer
                dead = [n for n in names if n not in got and not self.procs[n].is_alive()]
                if dead:
                    raise RuntimeError(f"rank processes {dead} exited") from None
                continue
            if isinstance(ev, kind) and ev.name in names:  # type: ignore[attr-defined]
                got[ev.name] = ev  # type: ignore[attr-defined]
        return [got[n] for n in names]

    def send(self, name: str, msg: object) -> None:
        self.commands[name].put(msg)

    def connect(self, senders: list[str]) -> None:
        for name in senders:
            self.send(name, Peers([md for n, md in self.metadata.items() if n != name]))

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].join(5.0)

    def stop(self) -> None:
        live = [n for n, p in self.procs.items() if p.is_alive()]
        for n in live:
            self.send(n, Stop())
        try:
            self.collect(Closed, live, 20.0)
        finally:
            for p in self.procs.values():
                p.join(1.0)
                if p.is_alive():
                    p.kill()
                    p.join(1.0)


@contextmanager
def ranks(specs: list[RankSpec]) -> Iterator[Ranks]:
    r = Ranks(specs)
    try:
        r.wait_ready()
        yield r
    finally:
        r.stop()
