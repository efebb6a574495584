"""Ranks 1..N-1 of a TP group: build the same model slice, then execute what rank 0 broadcasts.

Every message is a small dataclass broadcast by the leader; the worker answers by taking part in
the same collectives (the model's all-reduces, KV gathers), so no reply channel is needed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.engine.batch import StepBatch
from services.engine.config import EngineArgs, ModelConfig
from services.engine.dist import TPGroup, make_store
from services.engine.runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class Step:
    batch: StepBatch


@dataclass
class ReadKV:
    slots: list[tuple[int, int]]


@dataclass
class WriteKV:
    slots: list[tuple[int, int]]
    shape: tuple[int, ...]  # the full-head tensor that follows in a broadcast


@dataclass
class Shutdown:
    pass


# Block hand-offs between groups (kvtransfer/group_transfer.py): every rank moves its own heads.
@dataclass
class OpenKVAgent:
    kind: str  # "auto" | "nixl" | "local"
    name: str  # the group's agent name; each rank appends "-r<rank>"


@dataclass
class SendKVBlocks:
    pairs: list[tuple[int, int, bytes, str, np.ndarray]]  # (src rank, dst rank, dst metadata, id, descriptors)
    timeout_s: float


@dataclass
class ReceiveKVBlocks:
    pairs: list[tuple[int, str]]  # (dst rank, transfer id) of every piece this group receives
    timeout_s: float


_KV_MESSAGES = (OpenKVAgent, SendKVBlocks, ReceiveKVBlocks)


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
    """The follower loop: run every broadcast message until Shutdown."""
    kv_agent: Any = None  # this rank's kvtransfer.group_transfer.RankAgent, once opened
    try:
        while True:
            msg = group.broadcast_object()
            if isinstance(msg, Step):
                runner.execute(msg.batch)
            elif isinstance(msg, ReadKV):
                group.all_gather(runner.read_kv(msg.slots))
            elif isinstance(msg, WriteKV):
                full = torch.empty(msg.shape, dtype=runner.dtype, device=group.device)
                group.broadcast(full)
                runner.write_kv(msg.slots, full)
            elif isinstance(msg, _KV_MESSAGES):
                from kvtransfer.group_transfer import serve_message
                kv_agent = serve_message(kv_agent, msg, runner.kv_cache, group.rank, group.all_gather)
            elif isinstance(msg, Shutdown):
                return
    finally:
        if kv_agent is not None:
            kv_agent.close()


def run_worker(args: EngineArgs, rank: int) -> None:
    """Entry point of a non-leader rank process (spawned by LLMEngine or started by a slot service)."""
    logging.basicConfig(level=os.environ.get("NITSUM_LOG_LEVEL", "WARNING"))
    set_threads(args.tp)
    cfg = ModelConfig.from_dir(args.model)
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{rank}")
    group = open_group(args, rank, device)
    runner = ModelRunner(args, cfg, rank, group)
    try:
        serve_rank(runner, group)
    except Exception:  # the leader went away: nothing left to serve
        log.exception("rank %d stopping", rank)
