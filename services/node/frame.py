"""The life of a slot process.

Rank 0 (the group leader): build the engine (which waits for the group's other ranks), start the
engine thread and the gRPC server, register the group and its slots in Redis and keep the lease
alive with heartbeats, follow cancellations; on SIGTERM/SIGINT: unregister (so no new work comes),
stop the server with a short grace, stop the engine thread, shut the engine down.
Ranks 1..N-1: `services.engine.worker.run_worker`, which serves the leader's broadcasts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import time
from abc import ABC, abstractmethod

import grpc

from kvtransfer.base import KVHandoff
from kvtransfer.group_transfer import backend_of, open_agents
from services.cluster import ClusterClient, GroupRecord, SlotRecord
from services.config import NodeConfig
from services.engine import EngineArgs, EngineError, LLMEngine, RequestOutput, SamplingParams
from services.engine.policy import NO_SLO, SLO
from services.metrics import NodeMetrics
from services.rpc import CHANNEL_OPTIONS, error, pb
from services.tasks import TaskSet

from .engine_loop import EngineLoop

log = logging.getLogger("nitsum.node")


def engine_args(config: NodeConfig) -> EngineArgs:
    return EngineArgs(model=str(config.model), tp=config.tp, device=config.device, dtype=config.dtype,
                      block_size=config.block_size, max_num_seqs=config.max_num_seqs,
                      dist_addr=config.dist_addr, dist_prefix=config.dist_prefix,
                      spawn_workers=config.dist_addr is None)


def run_follower(config: NodeConfig) -> int:
    from services.engine.worker import run_worker

    run_worker(engine_args(config), config.rank)
    return 0


class GroupLeader(ABC):
    """Shared by prefill and decode leaders; subclasses add their gRPC services and output handling."""

    def __init__(self, config: NodeConfig, metrics: NodeMetrics | None = None) -> None:
        self.config = config
        self.tasks = TaskSet(f"{config.role}-{config.group_id}")
        self.metrics = metrics or NodeMetrics()
        self.cluster = ClusterClient(config.redis.url, config.redis.prefix)
        self.engine: LLMEngine | None = None
        self.loop: EngineLoop | None = None
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self.aborted = 0
        self.kv_backend = "grpc"  # what moves this group's KV hand-offs: grpc, or the agents' nixl | local
        self.kv_metadata: list[bytes] = []  # every rank's agent metadata, once the agents are open
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()  # set on SIGTERM/SIGINT, or when the engine thread dies

    @abstractmethod
    def add_services(self, server: grpc.aio.Server) -> None: ...

    @abstractmethod
    def on_outputs(self, outputs: list[RequestOutput]) -> None:
        """Called on the event loop with each step's outputs."""

    @abstractmethod
    async def on_cancel(self, request_id: str) -> None:
        """The client of this request went away."""

    @abstractmethod
    async def drain(self, command: pb.DrainCommand) -> tuple[pb.DrainResult, list[KVHandoff]]:
        """For a reconfiguration: take no new work and empty the group (the role says how). Returns
        what happened and the requests taken out that no group took, for the slot to park."""

    async def serve(self) -> int:
        """A static group's whole life (`nitsum prefill` / `nitsum decode`): load, serve, stop on a signal."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        engine = await asyncio.to_thread(LLMEngine, engine_args(self.config))
        if self.config.metrics_port:
            from prometheus_client import start_http_server
            start_http_server(self.config.metrics_port, self.config.host, registry=self.metrics.registry)
        await self.start(engine)
        await self.stopping.wait()
        await self.stop()
        engine.shutdown()
        await self.cluster.close()
        return 0

    async def start(self, engine: LLMEngine) -> None:
        """Serve `engine`: engine thread, gRPC server, registration and heartbeats."""
        self.engine = engine
        await self._open_kv_agents(engine)
        self.loop = EngineLoop(self.engine, self.on_outputs, self._count_step)
        self.loop.start()
        self.server = server = grpc.aio.server(options=CHANNEL_OPTIONS)
        self.add_services(server)
        port = server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        await server.start()
        self.address = f"{self.config.host}:{port}"
        await self._heartbeat_once()
        self._heartbeat_task = self.tasks.spawn(self._heartbeats(), name="heartbeat")
        self.tasks.spawn(self._follow_cancellations(), name="cancellations")
        log.info("%s group %s ready at %s (tp %d, epoch %d)", self.config.role, self.config.group_id, self.address,
                 self.config.tp, self.config.epoch)

    def _count_step(self, seconds: float) -> None:
        self.metrics.steps.inc()
        self.metrics.step_seconds.observe(seconds)

    async def _open_kv_agents(self, engine: LLMEngine) -> None:
        """The block path: an agent on every rank, registered over its KV cache for the group's
        life (this epoch); the engine's shutdown closes them. On failure the group uses gRPC."""
        kind, gid = self.config.kv_backend, self.config.group_id
        if kind != "grpc":
            try:
                self.kv_metadata = await asyncio.to_thread(open_agents, engine, kind, f"{gid}-e{self.config.epoch}")
                self.kv_backend = backend_of(engine)
            except EngineError as e:
                log.warning("group %s: %s; it moves KV over gRPC instead", gid, e)
        self.metrics.set_kv_backend(self.kv_backend)
        log.info("group %s moves KV between groups over the %s backend (kv_backend %s)", gid, self.kv_backend, kind)

    async def stop(self) -> None:
        """Unregister (so no new work comes), stop the server with a short grace, stop the engine
        thread. The engine itself is left to the caller (a slot keeps its weights)."""
        if self._heartbeat_task is not None:  # or a last heartbeat would register the group again
            self._heartbeat_task.cancel()
            await asyncio.wait([self._heartbeat_task])
        try:
            await self.cluster.unregister_group(self.config.group_id)
        except Exception:  # Redis already gone: the lease expires by itself
            log.warning("could not unregister group %s", self.config.group_id)
        if self.server is not None:
            await self.server.stop(grace=1.0)
        await self.tasks.cancel_all()
        await self.close()
        if self.loop is not None:
            self.loop.stop()

    @abstractmethod
    async def close(self) -> None:
        """Role-specific cleanup before the engine stops."""

    def record(self) -> GroupRecord:
        assert self.loop is not None and self.engine is not None
        s = self.loop.stats
        base, per_token, per_decode, per_context = s.step_model
        return GroupRecord(group_id=self.config.group_id, role=self.config.role, tp=self.config.tp,
                           epoch=self.config.epoch, address=self.address, running=s.running,
                           max_running=self.config.max_num_seqs, free_kv_blocks=s.free_blocks,
                           used_kv_blocks=s.used_blocks, block_size=self.config.block_size,
                           max_model_len=self.engine.max_model_len, queued_tokens=s.queued_tokens,
                           model=self.config.model.name, pid=os.getpid(), aborted=self.aborted,
                           prefill_tokens_per_s=1.0 / per_token if per_token > 0 else 0.0, step_base_s=base,
                           step_per_token_s=per_token, step_per_decode_s=per_decode, step_per_context_s=per_context)

    async def _heartbeat_once(self) -> None:
        group = self.record()
        self.metrics.groups.observe(group)
        await self.cluster.heartbeat_group(group, self.config.lease_ms)
        if self.config.slot_id:  # a slot process announces itself (services/node/slot.py)
            return
        for rank in range(self.config.tp):
            slot = SlotRecord(f"{self.config.group_id}-r{rank}", self.config.group_id, rank, self.config.role,
                              self.config.tp, self.config.epoch, os.getpid() if rank == 0 else 0)
            await self.cluster.heartbeat_slot(slot, self.config.lease_ms)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            if self.loop is not None and self.loop.failure is not None:
                log.error("engine failed; stopping so the lease expires and the group is replaced")
                self.stopping.set()
                return
            try:
                await self._heartbeat_once()
            except Exception:
                log.exception("heartbeat failed; retrying")

    async def _follow_cancellations(self) -> None:
        while True:
            try:
                async for request_id in self.cluster.cancellations():
                    await self.on_cancel(request_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cancellation feed failed; resubscribing")
                await asyncio.sleep(0.5)

    def health(self) -> pb.HealthReply:
        s = self.loop.stats if self.loop is not None else None
        return pb.HealthReply(ready=self.loop is not None and self.loop.failure is None, group_id=self.config.group_id,
                              role=self.config.role, tp=self.config.tp, epoch=self.config.epoch,
                              running=s.running if s else 0, free_kv_blocks=s.free_blocks if s else 0)


def sampling_of(p: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                          seed=p.seed if p.has_seed else None, stop_token_ids=tuple(p.stop_token_ids),
                          ignore_eos=p.ignore_eos)


def slo_of(q: pb.QueuedRequest) -> SLO:
    """The request's tier as the engine schedules it (services/engine/policy.py); none without one."""
    if not q.HasField("slo"):
        return NO_SLO
    s = q.slo
    return SLO(deadline_s=q.arrival_s + s.ttft_s if s.ttft_s > 0 else math.inf,
               tpot_s=s.tpot_s if s.tpot_s > 0 else math.inf, weight=s.weight,
               starved_at_s=q.arrival_s + s.max_wait_s if s.max_wait_s > 0 else math.inf)


async def emit_first_token(cluster: ClusterClient, q: pb.QueuedRequest, out: RequestOutput,
                           next_group: str) -> tuple[int, bool]:
    """A prefilled request's first token on its stream (with its prompt length; naming the group
    that decodes it next, unless it is already done): (the token, whether it is done)."""
    first = out.new_token_ids[0]
    done = out.finish_reason in ("stop", "length", "abort")
    await cluster.emit(q.request_id, pb.TokenEvent(token_ids=[first], finish_reason=out.finish_reason if done else "",
                                                   time_s=time.time(), prompt_tokens=len(q.prompt_ids),
                                                   next_group="" if done else next_group, index=out.index,
                                                   attempt=q.attempt))
    return first, done


class PrefillRPC:
    """The router's Prefill RPC as a prefill-capable leader (prefill_node's, decode_node's colocated
    one) answers it: `_prefill` does the work; an unexpected failure becomes an INTERNAL error event
    on the request's stream and in the reply; RPCs in flight are counted for a drain to wait on."""

    cluster: ClusterClient
    _in_flight: int = 0  # Prefill RPCs not answered yet

    async def _prefill(self, request: pb.PrefillRequest) -> pb.PrefillReply:
        raise NotImplementedError

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillReply:  # noqa: N802
        q = request.request
        self._in_flight += 1
        try:
            return await self._prefill(request)
        except Exception:
            log.exception("prefill of %s failed", q.request_id)
            e = error(pb.INTERNAL, f"prefill of {q.request_id} failed")
            await self.cluster.emit(q.request_id, pb.TokenEvent(error=e, time_s=time.time(), attempt=q.attempt))
            return pb.PrefillReply(error=e)
        finally:
            self._in_flight -= 1

    async def _wait_prefills(self, wait_s: float) -> tuple[int, float]:
        """Wait (up to `wait_s`) until every Prefill RPC is answered: (how many were in flight when
        the wait began, the wait's monotonic deadline)."""
        pending = self._in_flight
        deadline = time.monotonic() + wait_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return pending, deadline
