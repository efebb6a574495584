"""The steps of one re-cut (a `PlanDiff` carried out over the slots' control service):

1. freeze: the router stops routing to the groups that go and waits for its dispatches to them;
2. drain: each group that goes and decodes (decode or colocated) lets requests near their end
   finish and migrates the rest (KV, tokens, seed) to a decode or colocated group that stays, or
   parks them in its slot; a prefill or colocated group first answers the prompts it was given;
3. release: the slots that change stop serving, keeping their weights;
4. reshard: each slot whose (TP degree, rank) changes keeps the bytes it holds, fetches the rest
   from peer slots, and reads from the checkpoint only what no peer holds;
5. activate: the new groups form their process groups (one TCPStore per transition, a key prefix
   per group) and register.

Each step's seconds go into the report; on any failure the frozen groups are unfrozen and the
error goes to the orchestrator, which re-plans on the live slots."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from router.decide.scheduler import role_does_decode
from services.cluster import ClusterClient
from services.rpc import pb

from .diff import PlanDiff, ServingGroup, SlotView
from .report import GroupReport, ReconfigReport
from .slots import SlotClient


class RoutingControl(Protocol):
    """What the orchestrator needs from the router (router.live.service.Router implements it)."""

    def freeze(self, group_ids: set[str]) -> None: ...
    def unfreeze(self, group_ids: set[str]) -> None: ...
    def set_epoch(self, epoch: int) -> None: ...
    async def wait_idle(self, group_ids: set[str], timeout_s: float) -> None: ...


@dataclass
class OrchestratorSettings:
    finish_within: int = 16  # a decode request this close to its end finishes in place
    drain_wait_s: float = 5.0  # then the rest migrates
    step_timeout_s: float = 120.0


@dataclass
class Recut:
    slots: SlotClient
    cluster: ClusterClient
    routing: RoutingControl
    settings: OrchestratorSettings
    views: dict[int, SlotView]
    diff: PlanDiff
    report: ReconfigReport
    ready: dict[str, float] = field(default_factory=dict)  # new group -> seconds until it served
    stats: dict[int, pb.ReshardResult] = field(default_factory=dict)
    _mark: float = 0.0

    async def run(self) -> None:
        """Steps 1-5; the caller switches routing to the new epoch once this returns."""
        started = self._mark = time.perf_counter()
        gone = {g.group_id for g in self.diff.gone}
        self.routing.freeze(gone)
        try:
            await self.routing.wait_idle(gone, self.settings.step_timeout_s)
            self._step("freeze")
            await self._drain()
            self._step("drain")
            await asyncio.gather(*(self.slots.release(self._address(i), self.settings.step_timeout_s)
                                   for i in self.diff.changed))
            self._step("release")
            store = await self.slots.open_store(self._address(self.diff.changed[0])) if self.diff.needs_store else ""
            await self._reshard(store)
            self._step("reshard")
            await asyncio.gather(*(self._activate(g, store, started) for g in self.diff.new))
            self._step("activate")
        except BaseException:
            self.routing.unfreeze(gone)  # the recovery decides again from what still serves
            raise

    def _step(self, name: str) -> None:
        now = time.perf_counter()
        self.report.steps[name] = round(self.report.steps.get(name, 0.0) + now - self._mark, 4)
        self._mark = now

    def _address(self, slot: int) -> str:
        return self.views[slot].address

    async def _drain(self) -> None:
        s = self.settings
        records = {g.group_id: g for g in await self.cluster.groups()}
        stay = [(g.group_id, records[g.group_id].address) for g in self.diff.kept
                if role_does_decode(g.role) and g.group_id in records]
        drains = await asyncio.gather(*(self.slots.drain(self._address(g.slots[0]), s.finish_within, s.drain_wait_s,
                                                         stay, s.step_timeout_s) for g in self.diff.gone))
        for d in drains:
            self.report.finished_in_place += d.finished
            self.report.migrated += d.migrated
            self.report.parked += d.parked

    async def _reshard(self, store: str) -> None:
        need = self.diff.need
        if not need:
            return
        held = {i: h for i in self.diff.changed if (h := self.views[i].held) is not None}
        participants = sorted(set(held) | set(need))
        prefix = f"e{self.diff.epoch}/reshard/"
        replies = await asyncio.gather(*(self.slots.reshard(self._address(i), store, prefix, held, need,
                                                            self.settings.step_timeout_s) for i in participants))
        self.stats = dict(zip(participants, replies, strict=True))

    async def _activate(self, g: ServingGroup, store: str, started: float) -> None:
        epoch = self.diff.epoch
        await asyncio.gather(*(self.slots.activate(
            self._address(i), pb.Assignment(epoch=epoch, group_id=g.group_id, role=g.role, tp=g.tp, rank=r),
            store, f"e{epoch}/{g.group_id}/", self.settings.step_timeout_s) for r, i in enumerate(g.slots)))
        self.ready[g.group_id] = time.perf_counter() - started

    def group_reports(self) -> list[GroupReport]:
        """Per new group: its pause and where its weight bytes came from."""
        out = []
        for g in self.diff.new:
            r = GroupReport(g.group_id, g.role, g.tp, list(g.slots), kept=False, pause_s=self.ready[g.group_id])
            for i in g.slots:
                st = self.stats.get(i)
                if st is None:  # unchanged shard (a role switch): every byte stays in place
                    r.kept_bytes += self.views[i].held_bytes
                else:
                    r.kept_bytes += st.kept_bytes
                    r.peer_bytes += st.peer_bytes
                    r.disk_bytes += st.disk_bytes
            out.append(r)
        return out
