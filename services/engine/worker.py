"""Ranks 1..N-1 of a TP group: build the same model slice, then run what rank 0 broadcasts.

The worker is a dispatcher. Every message is a small dataclass broadcast by the leader, and the
follower runs the handler registered for its type (`register_handler`); a handler answers by
taking part in the same collectives as the leader (the model's all-reduces, KV gathers), so no
reply channel is needed. The engine registers its own messages here (Step, ReadKV, WriteKV,
Shutdown); whoever else needs a rank to do something defines its messages and registers their
handlers when its module is imported (the KV block hand-offs: `kvtransfer.group_transfer`).

Registration is per process. A follower serving in a process that imported those modules (a
slot's follower thread) has their handlers; a spawned rank process imports the modules named by
`handler_modules()` of the process that spawned it (`run_worker(..., modules)`, passed by
`LLMEngine`), so import them before building the engine.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from services.engine.batch import StepBatch
from services.engine.config import EngineArgs, ModelConfig
from services.engine.dist import TPGroup, make_store
from services.engine.errors import EngineError
from services.engine.runner import ModelRunner

log = logging.getLogger(__name__)

M = TypeVar("M")


class Closeable(Protocol):
    def close(self) -> None: ...


@dataclass
class RankContext:
    """What a handler works with on a follower rank, and what it keeps between messages."""

    runner: ModelRunner
    group: TPGroup
    # What handlers keep between messages (e.g. a KV agent), by key; closed when the rank stops.
    resources: dict[str, Closeable] = field(default_factory=dict)
    stopped: bool = False

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def kv_cache(self) -> torch.Tensor:
        """This rank's whole KV cache tensor (layout: `runner.py`)."""
        return self.runner.kv_cache

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return self.group.all_gather(t)

    def close(self) -> None:
        for key, resource in list(self.resources.items()):
            try:
                resource.close()
            except Exception:
                log.exception("rank %d: could not close %s", self.rank, key)
        self.resources.clear()


Handler = Callable[[RankContext, Any], None]
_HANDLERS: dict[type, Handler] = {}


def register_handler(message_type: type[M], fn: Callable[[RankContext, M], None]) -> None:
    """Run `fn(rank, msg)` on every follower rank of this process that is broadcast a `message_type`."""
    _HANDLERS[message_type] = fn


def handler_modules() -> list[str]:
    """The modules whose handlers are registered in this process, besides the engine's own: what a
    spawned rank process imports to register the same ones."""
    return sorted({fn.__module__ for fn in _HANDLERS.values()} - {__name__, "__main__"})


# ---- the engine's own messages -------------------------------------------------------------------
@dataclass
class Step:
    batch: StepBatch


@dataclass
class ReadKV:
    positions: list[tuple[int, int]]  # (block, offset) cache positions


@dataclass
class WriteKV:
    positions: list[tuple[int, int]]  # (block, offset) cache positions
    shape: tuple[int, ...]  # the full-head tensor that follows in a broadcast


@dataclass
class Shutdown:
    pass


def _step(rank: RankContext, msg: Step) -> None:
    rank.runner.execute(msg.batch)


def _read_kv(rank: RankContext, msg: ReadKV) -> None:
    rank.all_gather(rank.runner.read_kv(msg.positions))


def _write_kv(rank: RankContext, msg: WriteKV) -> None:
    full = torch.empty(msg.shape, dtype=rank.runner.dtype, device=rank.group.device)
    rank.group.broadcast(full)
    rank.runner.write_kv(msg.positions, full)


def _shutdown(rank: RankContext, msg: Shutdown) -> None:
    rank.stopped = True


register_handler(Step, _step)
register_handler(ReadKV, _read_kv)
register_handler(WriteKV, _write_kv)
register_handler(Shutdown, _shutdown)


# ---- serving ---------------------------------------------------------------------------------------
def set_threads(tp: int) -> None:
    """Split the host's cores between the ranks on it, so they do not oversubscribe.

    An explicit OMP_NUM_THREADS wins: a launcher that runs several groups on one host knows
    the whole split (see services/launch.py)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))


def open_group(args: EngineArgs, rank: int, device: torch.device) -> TPGroup:
    assert args.dist_addr is not None
    store = make_store(args.dist_addr, is_master=False, timeout_s=args.dist_timeout_s)
    return TPGroup(store, args.dist_prefix, rank, args.tp, device, args.dist_timeout_s)


def serve_rank(runner: ModelRunner, group: TPGroup) -> None:
    """The follower loop: run every broadcast message's handler until Shutdown.

    A message with no handler here raises EngineError: the leader would otherwise wait forever
    in the collective that handler should have joined."""
    rank = RankContext(runner, group)
    try:
        while not rank.stopped:
            msg = group.broadcast_object()
            handler = _HANDLERS.get(type(msg))
            if handler is None:
                raise EngineError(f"rank {group.rank} has no handler for {type(msg).__qualname__} "
                                  f"(import {type(msg).__module__} where this rank is started)")
            handler(rank, msg)
    finally:
        rank.close()


def run_worker(args: EngineArgs, rank: int, modules: Sequence[str] = ()) -> None:
    """Entry point of a non-leader rank process (spawned by LLMEngine or started by a slot service).
    `modules`: imported first, to register their handlers (the spawner's `handler_modules()`)."""
    logging.basicConfig(level=os.environ.get("NITSUM_LOG_LEVEL", "WARNING"))
    for name in modules:
        importlib.import_module(name)
    set_threads(args.tp)
    cfg = ModelConfig.from_dir(args.model)
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{rank}")
    group = open_group(args, rank, device)
    runner = ModelRunner(args, cfg, rank, group)
    try:
        serve_rank(runner, group)
    except Exception:  # the leader went away: nothing left to serve
        log.exception("rank %d stopping", rank)
