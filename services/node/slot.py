"""A slot: one long-lived process standing in for one accelerator, re-cut into groups at runtime.

A slot holds a weight shard (a TP degree and rank) and, while the plan gives it a group, serves in
it: rank 0 as the group's prefill or decode leader (services/node/frame.py), other ranks as
followers executing what the leader broadcasts (services/engine/worker.py). The orchestrator
(router/orchestrator.py) moves slots from plan epoch e to e+1 with these verbs, each a
`SlotControl.Command` with JSON arguments and a JSON result:

  status                   -> {index, pid, held: [tp, rank] | null, group: {...} | null, parked,
                               kv_backend: what its group's hand-offs use (leaders) | null}
  open_store {}            -> {addr}: host a TCPStore for this transition's process groups
  drain {finish_within, wait_s, targets: [[group_id, address], ...]}
                           -> {finished, migrated, parked}: leaders only (a no-op elsewhere)
  release {}               -> {}: stop serving. The leader unregisters its group, stops its server
                              and engine thread and tells its followers to stop; a follower waits
                              for that. Weights (and the KV cache) stay in memory.
  reshard {store, prefix, held: {slot: [tp, rank] | null}, need: {slot: [tp, rank]}}
                           -> {kept_bytes, peer_bytes, disk_bytes, sent_bytes, seconds}: collective
                              over every slot named; keeps what it holds, fetches the rest from
                              peers, reads from the checkpoint only what no peer holds
  activate {epoch, group_id, role, tp, rank, store, prefix}
                           -> {address, seconds}: form the group's process group and serve
  resume {targets}         -> {migrated, parked}: hand parked requests to decode groups

Parked requests are ones a draining decode group took out when no decode group that stays could
take them; the slot keeps their KV and hands them to the next epoch's decode groups (`resume`).
Meanwhile their output streams name this slot (`slot:<index>`), whose lease the gateway watches.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from kvtransfer.agent import set_agent_host
from kvtransfer.base import KVHandoff, TransferState
from kvtransfer.grpc_backend import GrpcKVBackend
from services.cluster import ClusterClient, SlotRecord
from services.cluster.redis_server import free_port
from services.config import KVBackendSetting, NodeConfig, RedisSettings
from services.engine.config import EngineArgs, ModelConfig
from services.engine.dist import TPGroup, make_store
from services.engine.engine import LLMEngine, attach_group
from services.engine.reshard import Layout, checkpoint_shapes, plan_pieces, reshard
from services.engine.runner import ModelRunner
from services.engine.tokenizer import Tokenizer
from services.engine.worker import serve_rank
from services.metrics import NodeMetrics
from services.node.frame import GRPC_OPTIONS, GroupLeader, error
from services.rpc import pb, pb_grpc
from services.tasks import TaskSet

log = logging.getLogger("nitsum.slot")


@dataclass(frozen=True)
class SlotConfig:
    index: int
    model: Path
    redis: RedisSettings
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 64
    lease_ms: int = 3000
    heartbeat_s: float = 0.5
    dist_timeout_s: float = 60.0
    kv_cache_bytes: int = 1 << 30
    kv_backend: KVBackendSetting = "auto"  # NodeConfig.kv_backend of every group this slot leads

    @property
    def slot_id(self) -> str:
        return f"slot:{self.index}"


@dataclass(frozen=True)
class Assignment:
    epoch: int
    group_id: str
    role: str
    tp: int
    rank: int

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "group_id": self.group_id, "role": self.role, "tp": self.tp, "rank": self.rank}


class SlotError(Exception):
    """A command that cannot be carried out in the slot's state (answered as an error, not a crash)."""


def _layout(value: Any) -> Layout | None:
    return None if value is None else Layout(int(value[0]), int(value[1]))


class Slot(pb_grpc.SlotControlServicer):
    def __init__(self, config: SlotConfig) -> None:
        self.config = config
        self.cfg = ModelConfig.from_dir(config.model)
        self.device = torch.device(config.device)
        self.cluster = ClusterClient(config.redis.url, config.redis.prefix)
        self.metrics = NodeMetrics()
        self.tasks = TaskSet(config.slot_id)
        self.runner: ModelRunner | None = None
        self.held: Layout | None = None
        self.prepared: tuple[Layout, ModelRunner] | None = None
        self.assignment: Assignment | None = None
        self.leader: GroupLeader | None = None
        self.follower: threading.Thread | None = None
        self.parked: list[KVHandoff] = []
        self.stores: list[torch.distributed.TCPStore] = []
        self.address = ""
        self.stop = asyncio.Event()
        self._sender: GrpcKVBackend | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        self._kv: torch.Tensor | None = None
        self._tok: Tokenizer | None = None
        self._head_packed: torch.Tensor | None = None  # kept across epochs: the head is never re-cut
        self._fault_count = 0
        self._busy = asyncio.Lock()

    # ---- process life -------------------------------------------------------------------------
    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb_grpc.add_SlotControlServicer_to_server(self, server)
        port = server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        await server.start()
        self.address = f"{self.config.host}:{port}"
        set_agent_host(self.config.host)  # where peers write this slot's KV (socket backend)
        if self.config.metrics_port:
            from prometheus_client import start_http_server
            start_http_server(self.config.metrics_port, self.config.host, registry=self.metrics.registry)
        await self._heartbeat_once()
        self.tasks.spawn(self._heartbeats(), name="heartbeat")
        log.info("slot %d ready at %s (pid %d)", self.config.index, self.address, os.getpid())
        await self.stop.wait()
        try:
            await self.cluster.unregister_slot(self.config.slot_id)
        except Exception:
            log.warning("could not unregister %s", self.config.slot_id)
        await server.stop(grace=0.5)
        await self.tasks.cancel_all()
        await asyncio.wait_for(self._release(), timeout=15)
        if self._sender is not None:
            await self._sender.close()
        await self.cluster.close()
        return 0

    def record(self) -> SlotRecord:
        a = self.assignment
        return SlotRecord(self.config.slot_id, a.group_id if a else "", a.rank if a else 0, a.role if a else "",
                          a.tp if a else 0, a.epoch if a else 0, os.getpid(), self.address, self.config.index)

    async def _heartbeat_once(self) -> None:
        await self.cluster.heartbeat_slot(self.record(), self.config.lease_ms)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            if self.leader is not None and self.leader.stopping.is_set():
                log.error("slot %d: its group's engine failed; stopping so the orchestrator re-plans",
                          self.config.index)
                self.stop.set()
                return
            try:
                await self._heartbeat_once()
            except Exception:
                log.exception("slot heartbeat failed; retrying")

    # ---- the control service ------------------------------------------------------------------
    async def Command(self, request: pb.SlotCommand, context: grpc.aio.ServicerContext) -> pb.SlotReply:  # noqa: N802
        handler = getattr(self, f"_verb_{request.verb}", None)
        self._maybe_die(request.verb)
        if handler is None:
            return pb.SlotReply(error=error(pb.BAD_REQUEST, f"unknown slot verb {request.verb!r}"))
        try:
            args = json.loads(request.args_json or "{}")
            if request.verb == "status":
                result = await handler(args)
            else:
                async with self._busy:
                    result = await handler(args)
            log.info("slot %d: %s -> %s", self.config.index, request.verb, result)
            return pb.SlotReply(result_json=json.dumps(result))
        except SlotError as e:
            return pb.SlotReply(error=error(pb.BAD_REQUEST, f"slot {self.config.index}: {e}"))
        except Exception as e:
            log.exception("slot %d: %s failed", self.config.index, request.verb)
            return pb.SlotReply(error=error(pb.INTERNAL, f"slot {self.config.index}: {request.verb} failed: {e!r}"))

    def _maybe_die(self, verb: str) -> None:
        """Test hook for a slot dying mid-reconfiguration (the one failure a test cannot provoke
        at the right moment from outside): NITSUM_SLOT_FAULT=VERB[:N] exits the process at once
        on the N-th (default first) command VERB."""
        fault = os.environ.get("NITSUM_SLOT_FAULT", "")
        if not fault:
            return
        name, _, nth = fault.partition(":")
        if name != verb:
            return
        self._fault_count += 1
        if self._fault_count == int(nth or 1):
            log.error("slot %d: NITSUM_SLOT_FAULT=%s: exiting now", self.config.index, fault)
            os._exit(70)

    async def _verb_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"index": self.config.index, "pid": os.getpid(), "address": self.address,
                "held": None if self.held is None else [self.held.tp, self.held.rank],
                "group": None if self.assignment is None else self.assignment.to_dict(),
                "held_bytes": self.runner.weight_bytes if self.runner is not None else 0,
                "serving": self.leader is not None or self.follower is not None, "parked": len(self.parked),
                "kv_backend": self.leader.kv_backend if self.leader is not None else None}

    async def _verb_open_store(self, args: dict[str, Any]) -> dict[str, Any]:
        port = free_port(self.config.host)
        store = await asyncio.to_thread(make_store, f"{self.config.host}:{port}", True, self.config.dist_timeout_s)
        self.stores = [*self.stores[-1:], store]  # the previous epoch's groups may still use theirs
        return {"addr": f"{self.config.host}:{port}"}

    async def _verb_drain(self, args: dict[str, Any]) -> dict[str, Any]:
        from decode_node.service import DecodeLeader
        from prefill_node.service import PrefillLeader

        wait_s = float(args.get("wait_s", 5.0))
        if isinstance(self.leader, PrefillLeader):
            return {"in_flight": await self.leader.drain(wait_s)}
        if not isinstance(self.leader, DecodeLeader):
            return {}
        targets = [(str(g), str(a)) for g, a in args.get("targets", [])]
        report = await self.leader.drain(int(args.get("finish_within", 8)), targets, wait_s)
        for handoff in report.parked:
            await self._park(handoff)
        return {"finished": report.finished, "migrated": report.migrated, "parked": len(report.parked)}

    async def _park(self, handoff: KVHandoff) -> None:
        self.parked.append(handoff)
        await self.cluster.emit(handoff.request.request_id,
                                pb.TokenEvent(time_s=time.time(), next_group=self.config.slot_id,
                                              attempt=handoff.request.attempt))

    async def _verb_release(self, args: dict[str, Any]) -> dict[str, Any]:
        await self._release()
        return {}

    async def _release(self) -> None:
        if self.leader is not None:
            leader, self.leader = self.leader, None
            await leader.stop()
            if leader.engine is not None:
                await asyncio.to_thread(leader.engine.shutdown)  # followers return from serve_rank
            await leader.cluster.close()
            self.metrics.groups.replace_all([])
        if self.follower is not None:
            thread, self.follower = self.follower, None
            await asyncio.to_thread(thread.join, self.config.dist_timeout_s)
            if thread.is_alive():
                raise SlotError("the group's follower loop did not stop")
        self.assignment = None
        await self._heartbeat_once()

    async def _verb_reshard(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.leader is not None or self.follower is not None:
            raise SlotError("reshard needs a released slot; release it first")
        held = {int(k): _layout(v) for k, v in args["held"].items()}
        need = {int(k): Layout(int(v[0]), int(v[1])) for k, v in args["need"].items()}
        me = self.config.index
        if held.get(me, self.held) != self.held:
            raise SlotError(f"told it holds {held.get(me)} but it holds {self.held}")
        started = time.perf_counter()
        if self._shapes is None:
            self._shapes = checkpoint_shapes(self.config.model, self.cfg)
        if not any(p.source == "peer" for pieces in plan_pieces(self.cfg, self._shapes, held, need).values()
                   for p in pieces):
            # Nothing moves between slots (a cold start, or only kept bytes): no exchange group.
            held = {me: held[me]} if me in held else {}
            need = {me: need[me]} if me in need else {}
        participants = sorted(set(held) | set(need))
        group = None
        if len(participants) > 1:
            group = await asyncio.to_thread(TPGroup, self._store(args["store"]), args["prefix"],
                                            participants.index(me), len(participants), self.device,
                                            self.config.dist_timeout_s, self.config.host)
        if self.runner is not None:
            self.runner.model.drop_packed()  # the shard is re-cut; only its plain bytes are read
        views = self.runner.model.shard_views() if self.runner is not None else None
        wanted = need.get(me)
        shapes = self._shapes
        got: list[Any] = []

        def fill(out: dict[str, torch.Tensor] | None) -> None:
            got.append(reshard(self.config.model, self.cfg, shapes, me, views, held, need, group,
                               self._engine_args(wanted.tp if wanted else 1).torch_dtype(self.cfg), self.device, out))

        if wanted is None:  # only a sender
            await asyncio.to_thread(fill, None)
        else:
            # The new model is built now and the reshard writes straight into its parameters;
            # it takes over the slot's KV cache memory (no new allocation, no zeroing).
            runner = await asyncio.to_thread(ModelRunner, self._engine_args(wanted.tp), self.cfg, wanted.rank, None,
                                             fill, self._kv_memory(), self._head_packed)
            if runner.model.lm_head_packed is not None:
                self._head_packed = runner.model.lm_head_packed
            self.prepared = (wanted, runner)
        stats = got[0][1]
        if group is not None:
            # Every rank is past the group's set-up and its transfers before any drops the group:
            # a rank that closes its connections early breaks a slower peer's connect.
            await asyncio.to_thread(group.all_reduce, torch.zeros(1, device=self.device))
        return {"kept_bytes": stats.kept_bytes, "peer_bytes": stats.peer_bytes, "disk_bytes": stats.disk_bytes,
                "sent_bytes": stats.sent_bytes, "seconds": time.perf_counter() - started}

    def _tokenizer(self) -> Tokenizer:
        """Read once: every epoch's engine serves the same checkpoint."""
        if self._tok is None:
            self._tok = Tokenizer(self.config.model, extra_eos_ids=self.cfg.eos_token_ids)
        return self._tok

    def _engine_args(self, tp: int) -> EngineArgs:
        return EngineArgs(str(self.config.model), tp=tp, device=self.config.device, dtype=self.config.dtype,
                          block_size=self.config.block_size, max_num_seqs=self.config.max_num_seqs,
                          kv_cache_bytes=self.config.kv_cache_bytes, spawn_workers=False,
                          dist_timeout_s=self.config.dist_timeout_s)

    def _kv_memory(self) -> torch.Tensor:
        """The slot's KV cache memory, allocated (and zeroed) once and lent to each epoch's model:
        every layout's cache fits in `kv_cache_bytes`."""
        if self._kv is None:
            dtype = self._engine_args(1).torch_dtype(self.cfg)
            self._kv = torch.zeros(self.config.kv_cache_bytes // dtype.itemsize, dtype=dtype, device=self.device)
        return self._kv

    def _store(self, addr: str) -> torch.distributed.Store:
        mine = f"{self.config.host}:{self.stores[-1].port}" if self.stores else ""
        if addr == mine:
            return self.stores[-1]
        return make_store(addr, False, self.config.dist_timeout_s)

    async def _verb_activate(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.leader is not None or self.follower is not None:
            raise SlotError("already serving; release first")
        started = time.perf_counter()
        a = Assignment(int(args["epoch"]), str(args["group_id"]), str(args["role"]), int(args["tp"]),
                       int(args["rank"]))
        layout = Layout(a.tp, a.rank)
        eargs = self._engine_args(a.tp)
        eargs.validate_for(self.cfg)
        group = None
        if a.tp > 1:
            group = await asyncio.to_thread(TPGroup, self._store(args["store"]), args["prefix"], a.rank, a.tp,
                                            self.device, self.config.dist_timeout_s, self.config.host)
        prepared, self.prepared = self.prepared, None  # one from an abandoned attempt is dropped too
        if prepared is not None and prepared[0] == layout:
            self.runner = prepared[1]  # the old shard is no longer needed
        elif self.runner is None or self.held != layout:
            raise SlotError(f"holds {self.held}, not the shard tp {a.tp} rank {a.rank}; reshard first")
        self.held = layout
        assert self.runner is not None
        if not self.runner.model.finalized:  # a reshard that came to nothing dropped its packed weights
            await asyncio.to_thread(self.runner.model.finalize, self._head_packed)
        attach_group(self.runner, group)
        self.assignment = a
        if a.rank == 0:
            await self._lead(a, eargs, group, args.get("store"))
        else:
            self.follower = threading.Thread(target=self._follow, args=(self.runner, group), daemon=True,
                                             name=f"follower-{a.group_id}")
            self.follower.start()
        await self._heartbeat_once()
        return {"address": self.leader.address if self.leader else "", "seconds": time.perf_counter() - started}

    async def _lead(self, a: Assignment, eargs: EngineArgs, group: TPGroup | None, store: str | None) -> None:
        assert self.runner is not None
        engine = await asyncio.to_thread(LLMEngine, eargs, self.runner, group, self._tokenizer())
        node = NodeConfig(role=a.role, model=self.config.model, group_id=a.group_id, rank=0, tp=a.tp,  # type: ignore[arg-type]
                          epoch=a.epoch, slot_id=self.config.slot_id, host=self.config.host, redis=self.config.redis,
                          dist_addr=store if a.tp > 1 else None, device=self.config.device, dtype=self.config.dtype,
                          block_size=self.config.block_size, max_num_seqs=self.config.max_num_seqs,
                          lease_ms=self.config.lease_ms, heartbeat_s=self.config.heartbeat_s,
                          kv_backend=self.config.kv_backend)
        if a.role == "prefill":
            from prefill_node.service import PrefillLeader
            self.leader = PrefillLeader(node, self.metrics)
        elif a.role == "decode":
            from decode_node.service import DecodeLeader
            self.leader = DecodeLeader(node, self.metrics)
        else:
            raise SlotError(f"role {a.role!r}: a slot serves prefill or decode")
        await self.leader.start(engine)

    def _follow(self, runner: ModelRunner, group: TPGroup | None) -> None:
        assert group is not None
        try:
            serve_rank(runner, group)
        except Exception:  # the leader went away: the orchestrator will re-plan this slot
            log.exception("slot %d: follower loop ended with an error", self.config.index)

    async def _verb_resume(self, args: dict[str, Any]) -> dict[str, Any]:
        targets = [(str(g), str(a)) for g, a in args.get("targets", [])]
        if self.parked and not targets:
            raise SlotError(f"{len(self.parked)} parked requests and no decode group to hand them to")
        if self._sender is None:
            self._sender = GrpcKVBackend()
        moved, kept = 0, []
        for i, handoff in enumerate(self.parked):
            for group_id, address in targets[i % len(targets):] + targets[: i % len(targets)]:
                sender = self._sender.sender(address)
                sender.send(handoff)
                if await sender.wait() is TransferState.DONE:
                    log.info("handed parked %s to %s", handoff.request.request_id, group_id)
                    await self.cluster.emit(handoff.request.request_id,
                                            pb.TokenEvent(time_s=time.time(), next_group=group_id,
                                                          attempt=handoff.request.attempt))
                    moved += 1
                    break
            else:
                kept.append(handoff)
        self.parked = kept
        return {"migrated": moved, "parked": len(kept)}
