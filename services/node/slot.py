"""A slot: one long-lived process standing in for one accelerator, re-cut into groups at runtime.

A slot holds a weight shard (a TP degree and rank: weights.py) and, while the plan gives it a
group, serves in it: rank 0 as the group's leader (the role's, injected: roles.py), other ranks as
followers executing what the leader broadcasts (services/engine/worker.py). The orchestrator
(router/reconfig) moves slots from plan epoch e to e+1 with typed commands (nitsum.proto
`SlotCommand`), one verb each:

  status      what it holds, the group it serves in, what is parked in it
  open_store  host a TCPStore for this transition's process groups
  drain       leaders only: stop taking work; a decode group finishes what is near its end and
              migrates the rest, parking what no decode group that stays takes
  release     stop serving: the leader unregisters its group and stops its engine and followers;
              weights and KV cache memory stay
  reshard     collective over every slot named: keep what it holds, fetch the rest from peers,
              read from the checkpoint only what no peer holds
  activate    form the group's process group and serve
  resume      hand parked requests to the new epoch's decode groups

Parked requests' output streams name this slot (`slot:<index>`) as their holder; if the slot dies
with them, the router resumes them from the tokens their clients have (router/live/recovery.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

import grpc
import torch

from kvtransfer.agent import set_agent_host
from services.cluster import ClusterClient, SlotRecord
from services.cluster.redis_server import free_port
from services.config import NodeConfig, SlotConfig
from services.engine.dist import TPGroup, make_store
from services.engine.engine import LLMEngine, attach_group
from services.engine.runner import ModelRunner
from services.engine.weights.reshard import Layout
from services.engine.worker import serve_rank
from services.metrics import NodeMetrics
from services.rpc import CHANNEL_OPTIONS, error, pb, pb_grpc
from services.tasks import TaskSet

from .frame import GroupLeader
from .roles import Roles
from .weights import SlotWeights, WeightsError

log = logging.getLogger("nitsum.slot")
__all__ = ["Slot", "SlotConfig", "SlotError"]


class SlotError(Exception):
    """A command that cannot be carried out in the slot's state (answered as an error, not a crash)."""


class Slot(pb_grpc.SlotControlServicer):
    def __init__(self, config: SlotConfig, roles: Roles) -> None:
        self.config = config
        self.roles = roles
        self.weights = SlotWeights(config)
        self.cluster = ClusterClient(config.redis.url, config.redis.prefix)
        self.metrics = NodeMetrics()
        self.tasks = TaskSet(config.slot_id)
        self.assignment: pb.Assignment | None = None
        self.leader: GroupLeader | None = None
        self.follower: threading.Thread | None = None
        self.stores: list[torch.distributed.TCPStore] = []
        self.address = ""
        self.stop = asyncio.Event()
        self._fault_count = 0
        self._busy = asyncio.Lock()

    # ---- process life -------------------------------------------------------------------------
    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
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
        await self.roles.parking.close()
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
        verb = request.WhichOneof("verb")
        if verb is None:
            return pb.SlotReply(error=error(pb.BAD_REQUEST, "a slot command names no verb"))
        self._maybe_die(verb)
        handler = getattr(self, f"_verb_{verb}")
        try:
            if verb == "status":
                result = await handler(getattr(request, verb))
            else:
                async with self._busy:
                    result = await handler(getattr(request, verb))
            log.info("slot %d: %s -> %s", self.config.index, verb, str(result).replace("\n", " "))
            return pb.SlotReply(**{verb: result})
        except (SlotError, WeightsError) as e:
            return pb.SlotReply(error=error(pb.BAD_REQUEST, f"slot {self.config.index}: {e}"))
        except Exception as e:
            log.exception("slot %d: %s failed", self.config.index, verb)
            return pb.SlotReply(error=error(pb.INTERNAL, f"slot {self.config.index}: {verb} failed: {e!r}"))

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

    async def _verb_status(self, cmd: pb.StatusCommand) -> pb.StatusResult:
        held = self.weights.held
        return pb.StatusResult(index=self.config.index, pid=os.getpid(), address=self.address,
                               held=pb.Layout(tp=held.tp, rank=held.rank) if held else None,
                               group=self.assignment, held_bytes=self.weights.held_bytes,
                               serving=self.leader is not None or self.follower is not None,
                               parked=len(self.roles.parking),
                               kv_backend=self.leader.kv_backend if self.leader is not None else "")

    async def _verb_open_store(self, cmd: pb.OpenStoreCommand) -> pb.OpenStoreResult:
        port = free_port(self.config.host)
        store = await asyncio.to_thread(make_store, f"{self.config.host}:{port}", True, self.config.dist_timeout_s)
        self.stores = [*self.stores[-1:], store]  # the previous epoch's groups may still use theirs
        return pb.OpenStoreResult(addr=f"{self.config.host}:{port}")

    def _store(self, addr: str) -> torch.distributed.Store:
        mine = f"{self.config.host}:{self.stores[-1].port}" if self.stores else ""
        if addr == mine:
            return self.stores[-1]
        return make_store(addr, False, self.config.dist_timeout_s)

    async def _verb_drain(self, cmd: pb.DrainCommand) -> pb.DrainResult:
        if self.leader is None:
            return pb.DrainResult()
        result, parked = await self.leader.drain(cmd)
        if parked:
            await self.roles.parking.park(parked, self.config.slot_id)
        return result

    async def _verb_release(self, cmd: pb.ReleaseCommand) -> pb.ReleaseResult:
        await self._release()
        return pb.ReleaseResult()

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

    async def _verb_reshard(self, cmd: pb.ReshardCommand) -> pb.ReshardResult:
        if self.leader is not None or self.follower is not None:
            raise SlotError("reshard needs a released slot; release it first")
        return await self.weights.reshard(cmd, self._store(cmd.store))

    async def _verb_activate(self, cmd: pb.ActivateCommand) -> pb.ActivateResult:
        if self.leader is not None or self.follower is not None:
            raise SlotError("already serving; release first")
        started = time.perf_counter()
        a = cmd.group
        if a.rank == 0 and a.role not in self.roles.leaders:
            raise SlotError(f"role {a.role!r}: this slot serves {', '.join(sorted(self.roles.leaders))}")
        self.weights.engine_args(a.tp).validate_for(self.weights.cfg)
        group = None
        if a.tp > 1:
            group = await asyncio.to_thread(TPGroup, self._store(cmd.store), cmd.prefix, a.rank, a.tp,
                                            self.weights.device, self.config.dist_timeout_s, self.config.host)
        runner = await self.weights.runner_for(Layout(a.tp, a.rank))
        attach_group(runner, group)
        self.assignment = a
        if a.rank == 0:
            await self._lead(a, runner, group, cmd.store)
        else:
            self.follower = threading.Thread(target=self._follow, args=(runner, group), daemon=True,
                                             name=f"follower-{a.group_id}")
            self.follower.start()
        await self._heartbeat_once()
        return pb.ActivateResult(address=self.leader.address if self.leader else "",
                                 seconds=time.perf_counter() - started)

    async def _lead(self, a: pb.Assignment, runner: ModelRunner, group: TPGroup | None, store: str) -> None:
        c = self.config
        engine = await asyncio.to_thread(LLMEngine, self.weights.engine_args(a.tp), runner, group,
                                         self.weights.tokenizer())
        node = NodeConfig(role=a.role, model=c.model, group_id=a.group_id, rank=0, tp=a.tp,  # type: ignore[arg-type]
                          epoch=a.epoch, slot_id=c.slot_id, host=c.host, redis=c.redis,
                          dist_addr=store if a.tp > 1 else None, device=c.device, dtype=c.dtype,
                          block_size=c.block_size, max_num_seqs=c.max_num_seqs, lease_ms=c.lease_ms,
                          heartbeat_s=c.heartbeat_s, kv_backend=c.kv_backend)
        self.leader = self.roles.leaders[a.role](node, self.metrics)
        await self.leader.start(engine)

    def _follow(self, runner: ModelRunner, group: TPGroup | None) -> None:
        assert group is not None
        try:
            serve_rank(runner, group)
        except Exception:  # the leader went away: the orchestrator will re-plan this slot
            log.exception("slot %d: follower loop ended with an error", self.config.index)

    async def _verb_resume(self, cmd: pb.ResumeCommand) -> pb.ResumeResult:
        targets = [(t.group_id, t.address) for t in cmd.targets]
        if len(self.roles.parking) and not targets:
            raise SlotError(f"{len(self.roles.parking)} parked requests and no decode group to hand them to")
        moved, kept = await self.roles.parking.resume(targets)
        return pb.ResumeResult(migrated=moved, parked=kept)

