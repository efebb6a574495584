"""Block hand-offs between two TP groups' engines: every rank moves its own heads straight into
the destination ranks that own them (`kvtransfer.remap`), through its own agent (`agent.py`);
nothing is gathered through the leader.

The leader (rank 0, holding the `LLMEngine`) drives its group with the messages defined here
(OpenKVAgent, SendKVBlocks, ReceiveKVBlocks), which importing this module registers as follower
handlers (`services.engine.worker.register_handler`); every rank runs its part (`RankAgent.run`)
and the group agrees on the outcome with one all-gather of a status byte. The engine is used only
through its KV API (`services.engine.kv_io`): its cache, its group's broadcast and all-gather, and
a request's reservation, block ids and computed tokens.

Lifecycle of one hand-off, prefill group P (TP a) -> decode group D (TP b):
1. Once per group: `open_agents(engine, kind, name)` on both -> each rank's published metadata.
2. D: `reserve_blocks(engine, ...)` -> block ids for the request's computed tokens.
3. D: `receive_blocks(engine, ...)` and P: `send_blocks(engine, ...)`, concurrently; both return
   True once every rank's part is DONE. On False, D's reserved blocks are already freed; P still
   holds its blocks until it releases the request (it may send them elsewhere first).
4. D: `engine.finish_receive(...)` -> the request joins D's batch.

The calls block the engine thread for the transfer (the small model's 1k-token prompt is ~12 MB
per rank: milliseconds here); polling transfers from inside the step loop is the next step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from services.engine import LLMEngine, SamplingParams
from services.engine.errors import EngineError
from services.engine.policy import NO_SLO, SLO
from services.engine.worker import RankContext, register_handler

from .agent import make_agent
from .agent_base import AgentInfo, BlockTransfer, BlockTransferAgent
from .faults import maybe_die
from .remap import BlockLayout, expand_plan, plan_transfer
from .state import TransferState

log = logging.getLogger(__name__)
AllGather = Callable[[torch.Tensor], list[torch.Tensor]]


# Every rank moves its own heads: the leader broadcasts these, each follower's handler runs its part.
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


def pair_id(transfer_id: str, src_rank: int, dst_rank: int) -> str:
    return f"{transfer_id}:{src_rank}>{dst_rank}"


class RankAgent:
    """One rank's agent over its whole KV cache (registered once, for the group's life)."""

    def __init__(self, kind: str, name: str, cache: torch.Tensor) -> None:
        self.agent: BlockTransferAgent = make_agent(kind, name, cache)  # type: ignore[arg-type]

    def metadata(self) -> bytes:
        return self.agent.metadata()

    def run(self, sends: list[tuple[bytes, np.ndarray, str]], receives: list[str], timeout_s: float) -> bool:
        """Post `sends` ((peer metadata, descriptors, id)) and await `receives`; True if all landed.
        Never raises: every rank must reach the group's all-gather of the outcome."""
        transfers: list[BlockTransfer] = []
        try:
            for peer_meta, descs, tid in sends:
                transfers.append(self.agent.send(self._peer(peer_meta), descs, tid, timeout_s))
            transfers += [self.agent.receive(tid, timeout_s) for tid in receives]
        except Exception:
            log.exception("kvtransfer: agent %s could not post its transfers", self.agent.name)
            for t in transfers:
                t.cancel()
            return False
        if receives:
            maybe_die("kv-receive")
        while True:
            states = [t.poll() for t in transfers]
            if TransferState.FAILED in states or all(s.finished for s in states):
                break
            self.agent.progress()
            time.sleep(0.0002)
        if all(s is TransferState.DONE for s in states):
            return True
        for t in transfers:
            t.cancel()
        return False

    def _peer(self, metadata: bytes) -> str:
        """The peer's name, (re)loading its metadata when it is new or changed (a restarted group)."""
        info = AgentInfo.from_bytes(metadata)
        if self.agent.peers.get(info.name) != info:
            if info.name in self.agent.peers:
                self.agent.remove_peer(info.name)
            self.agent.add_peer(metadata)
        return info.name

    def close(self) -> None:
        self.agent.close()


def try_agent(kind: str, name: str, cache: torch.Tensor) -> RankAgent | None:
    """A rank's agent, or None (logged) when its backend cannot start here."""
    try:
        return RankAgent(kind, name, cache)
    except Exception:
        log.exception("kvtransfer: could not open agent %s (%s)", name, kind)
        return None


def gather_bytes(group_all_gather: AllGather, data: bytes) -> list[bytes]:
    """Every rank's `data`, in rank order (two all-gathers: lengths, then padded bytes)."""
    size = torch.tensor([len(data)], dtype=torch.long)
    sizes = [int(s.item()) for s in group_all_gather(size)]
    buf = torch.zeros(max(1, *sizes), dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return [bytes(b[:n].numpy().tobytes()) for b, n in zip(group_all_gather(buf), sizes, strict=True)]


def all_ok(engine: LLMEngine, ok: bool) -> bool:
    """True on every rank only if `ok` on every rank."""
    return all(bool(t.item()) for t in engine.all_gather(torch.tensor([int(ok)], dtype=torch.uint8)))


def backend_of(engine: LLMEngine) -> str:
    """The block backend of the engine's open agents ("nixl" | "local"), "" when none are open."""
    return str(engine.kv_agent.agent.backend_name) if engine.kv_agent is not None else ""


def open_agents(engine: LLMEngine, kind: str, name: str) -> list[bytes]:
    """Give every rank of the engine's group an agent; returns their metadata in rank order.
    Raises EngineError (the group keeps no agent on rank 0) when any rank's agent failed."""
    if engine.kv_agent is not None:
        raise EngineError("this group's KV agents are already open")
    engine.send_to_ranks(OpenKVAgent(kind, name))
    agent = try_agent(kind, f"{name}-r0", engine.kv_cache)
    mine = agent.metadata() if agent is not None else b""
    metadata = gather_bytes(engine.all_gather, mine)
    if not all(metadata):
        if agent is not None:
            agent.close()
        raise EngineError(f"ranks {[r for r, m in enumerate(metadata) if not m]} could not open a {kind} KV agent")
    engine.kv_agent = agent
    return metadata


@dataclass(frozen=True)
class BlockTarget:
    """Where a request's KV goes: the destination group's TP degree, ranks' metadata, block ids."""

    tp: int
    metadata: tuple[bytes, ...]
    block_ids: tuple[int, ...]


def layout(engine: LLMEngine, tp: int) -> BlockLayout:
    cfg, args = engine.model_config, engine.args
    return BlockLayout.for_rank(cfg.num_hidden_layers, cfg.num_key_value_heads, tp, args.block_size, cfg.head_dim,
                                engine.kv_cache.element_size())


def send_blocks(engine: LLMEngine, request_id: str, target: BlockTarget, transfer_id: str, timeout_s: float) -> bool:
    """Write the request's computed KV into the destination ranks; True once all of it landed."""
    if not engine.has_request(request_id) or engine.kv_agent is None:
        raise EngineError(f"request {request_id!r} holds no KV here, or the group has no KV agents")
    blocks = engine.block_ids(request_id)
    tp = engine.args.tp
    plan = plan_transfer(engine.model_config.num_key_value_heads, tp, target.tp)
    descs = expand_plan(plan, layout(engine, tp), layout(engine, target.tp), blocks,
                        list(target.block_ids[: len(blocks)]))
    msg = SendKVBlocks([(s, d, target.metadata[d], pair_id(transfer_id, s, d), dd) for (s, d), dd in descs.items()],
                       timeout_s)
    engine.send_to_ranks(msg)
    return all_ok(engine, run_sends(engine.kv_agent, msg, 0))


def run_sends(agent: RankAgent, msg: SendKVBlocks, rank: int) -> bool:
    return agent.run([(meta, descs, tid) for s, _, meta, tid, descs in msg.pairs if s == rank], [], msg.timeout_s)


def reserve_blocks(engine: LLMEngine, request_id: str, prompt_ids: list[int], params: SamplingParams,
                   num_tokens: int, slo: SLO = NO_SLO) -> list[int]:
    """Reserve a request that will receive KV for `num_tokens` tokens; its block ids in order."""
    return engine.reserve_kv(request_id, prompt_ids, params, num_tokens, slo)


def receive_blocks(engine: LLMEngine, request_id: str, src_tp: int, transfer_id: str, timeout_s: float) -> bool:
    """Await the request's KV on every rank; on failure its reserved blocks are freed."""
    if engine.kv_agent is None:
        raise EngineError("the group has no KV agents")
    pairs = plan_transfer(engine.model_config.num_key_value_heads, src_tp, engine.args.tp).pairs()
    msg = ReceiveKVBlocks([(d, pair_id(transfer_id, s, d)) for s, d in pairs], timeout_s)
    engine.send_to_ranks(msg)
    ok = all_ok(engine, run_receives(engine.kv_agent, msg, 0))
    if not ok:
        engine.abort(request_id)
    return ok


def run_receives(agent: RankAgent, msg: ReceiveKVBlocks, rank: int) -> bool:
    return agent.run([], [tid for d, tid in msg.pairs if d == rank], msg.timeout_s)


# ---- a follower rank's side of the messages above --------------------------------------------------
_AGENT = "kvtransfer.rank_agent"  # the rank's RankAgent in RankContext.resources


def _agent(rank: RankContext) -> RankAgent | None:
    agent = rank.resources.get(_AGENT)
    return agent if isinstance(agent, RankAgent) else None


def _open_agent(rank: RankContext, msg: OpenKVAgent) -> None:
    old = rank.resources.pop(_AGENT, None)
    if old is not None:  # not reached in practice: one agent per group, opened once
        old.close()
    agent = try_agent(msg.kind, f"{msg.name}-r{rank.rank}", rank.kv_cache)
    if agent is not None:
        rank.resources[_AGENT] = agent
    gather_bytes(rank.all_gather, agent.metadata() if agent is not None else b"")


def _send(rank: RankContext, msg: SendKVBlocks) -> None:
    agent = _agent(rank)
    all_gather_ok(rank.all_gather, agent is not None and run_sends(agent, msg, rank.rank))


def _receive(rank: RankContext, msg: ReceiveKVBlocks) -> None:
    agent = _agent(rank)
    all_gather_ok(rank.all_gather, agent is not None and run_receives(agent, msg, rank.rank))


def all_gather_ok(group_all_gather: AllGather, ok: bool) -> None:
    group_all_gather(torch.tensor([int(ok)], dtype=torch.uint8))


register_handler(OpenKVAgent, _open_agent)
register_handler(SendKVBlocks, _send)
register_handler(ReceiveKVBlocks, _receive)
