"""The orchestrator: moves the cluster from plan epoch e to e+1 while it serves.

It runs inside the leading router (it must stop and restart routing to the groups it re-cuts) and
drives the slot processes (services/node/slot.py) over their SlotControl service: the diff
(diff.py: a group of the new plan with the same role on the same slots as a serving group is
kept, under its old id; every other group goes and its slots are re-cut), then the steps
(steps.py: freeze, drain, release, reshard, activate); once all new groups are ready the router
switches to epoch e+1 and parked requests go to the new decode or colocated groups.

Every reconfiguration is accounted for (`ReconfigReport`): per group the pause it saw, bytes kept
/ from peers / from disk, requests finished in place, migrated and parked. A reconfiguration that
fails half-way (a slot dies, a fetch times out) is retried once towards a valid plan made of live
slots: the new plan without the groups that lost a slot (rolled forward), else the old one
(rolled back); a plan with no prefill-capable or no decode-capable group (a colocated group is
both) is never applied.

The plan asked for (at start, or by `apply`) is the target: when a slot dies while serving,
`heal` re-plans without its groups (their requests are resumed elsewhere, router/live/recovery.py), and
once every slot of the target answers again (`nitsum up` restarts a dead slot) it brings the
cluster back to the target ("restored").
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from router.decide.plans import Plan, parse_plan
from router.decide.scheduler import role_does_decode
from services.cluster import ClusterClient, PlanDoc
from services.rpc import ChannelPool

from .diff import SlotView, current_groups, describe, diff
from .report import GroupReport, ReconfigReport
from .slots import ReconfigError, SlotClient
from .steps import OrchestratorSettings, Recut, RoutingControl

log = logging.getLogger("nitsum.orchestrator")

__all__ = ["Orchestrator", "OrchestratorSettings", "PlanError", "ReconfigError", "ReconfigReport", "RoutingControl",
           "parse_plan_input"]


class PlanError(ValueError):
    """A plan that cannot be applied to this cluster (the caller's fault: HTTP 400)."""


class Orchestrator:
    def __init__(self, cluster: ClusterClient, routing: RoutingControl,
                 settings: OrchestratorSettings | None = None, channels: ChannelPool | None = None) -> None:
        self.cluster = cluster
        self.routing = routing
        self.settings = settings or OrchestratorSettings()
        self._own_channels = channels is None
        self.slots = SlotClient(channels or ChannelPool())
        self.epoch = 0
        self.plan: Plan | None = None
        self.target: Plan | None = None  # the plan asked for; `plan` may lack groups that lost a slot
        self.history: list[ReconfigReport] = []
        self._lock = asyncio.Lock()
        self.on_report: list[Any] = []  # callbacks(report): metrics

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    # ---- views ----------------------------------------------------------------------------
    async def slot_views(self) -> dict[int, SlotView]:
        """Every registered slot that answers its status (a dead one is left out)."""
        records = [r for r in await self.cluster.slots() if r.index >= 0 and r.address]

        async def status(address: str) -> Any:
            try:
                return await self.slots.status(address, timeout_s=5.0)
            except ReconfigError:
                return None

        replies = await asyncio.gather(*(status(r.address) for r in records))
        return {r.index: SlotView(r.index, r.address, (s.held.tp, s.held.rank) if s.HasField("held") else None,
                                  s.group if s.HasField("group") else None, s.serving, s.parked, s.held_bytes)
                for r, s in zip(records, replies, strict=True) if s is not None}

    async def wait_for_slots(self, count: int, timeout_s: float) -> dict[int, SlotView]:
        deadline = time.monotonic() + timeout_s
        while True:
            views = await self.slot_views()
            if all(i in views for i in range(count)) or time.monotonic() > deadline:
                return views
            await asyncio.sleep(0.2)

    async def show(self) -> dict[str, Any]:
        views = await self.slot_views()
        groups = current_groups(views)
        return {"epoch": self.epoch, "plan": describe(self.plan) if self.plan else "",
                "reconfiguring": self.busy,
                "groups": [{"group_id": g.group_id, "role": g.role, "tp": g.tp, "slots": list(g.slots),
                            "epoch": g.epoch} for g in groups],
                "slots": [{"index": v.index, "held": v.held, "group": v.group.group_id if v.group else None,
                           "parked": v.parked} for v in sorted(views.values(), key=lambda v: v.index)]}

    # ---- applying a plan ------------------------------------------------------------------
    def check(self, plan: Plan, views: dict[int, SlotView]) -> None:
        """Every plan `Plan` accepts (prefill, decode and colocated groups) is served; its slots must answer."""
        unknown = sorted(s for g in plan.groups for s in g.slots if s not in views)
        if unknown:
            raise PlanError(f"plan uses slot {unknown[0]}, which is not registered (live slots: "
                            f"{sorted(views) or 'none'})")

    async def apply(self, plan: Plan) -> ReconfigReport:
        """Move the cluster to `plan` (one reconfiguration at a time); raises PlanError on a plan
        this cluster cannot take, before anything changes."""
        async with self._lock:
            views = await self.slot_views()
            self.check(plan, views)
            asked_before, self.target = self.target, plan
            report = ReconfigReport(self.epoch, self.epoch + 1, describe(plan))
            started = time.perf_counter()
            try:
                await self._apply_once(plan, views, report)
            except Exception as e:
                log.exception("reconfiguration to %s failed; re-planning on the live slots", describe(plan))
                report.attempts.append({"plan": describe(plan), "error": str(e)})
                report.error = str(e)
                await self._recover(plan, report)
                if report.result == "rolled_back":  # the plan asked for did not take: the old one stays the target
                    self.target = asked_before
            report.seconds = time.perf_counter() - started
            self._finish(report)
            return report

    async def heal(self) -> ReconfigReport | None:
        """Outside a reconfiguration: when a slot of the current plan is gone (its process died),
        re-plan to the current plan without the groups that lost a slot, if that still has a
        prefill and a decode group (the router resumes the lost groups' requests elsewhere); once
        every slot of the target plan answers again (restarted), bring the cluster back to it."""
        if self.busy or self.plan is None:
            return None
        views = await self.slot_views()
        lost = [g for g in self.plan.groups if any(i not in views for i in g.slots)]
        if self.busy:
            return None
        if not lost:
            return await self._restore(views)
        live = [g for g in self.plan.groups if g not in lost]
        if not any(g.does_prefill for g in live) or not any(g.does_decode for g in live):
            return None  # nothing valid to re-plan to: requests wait in their queues for the slot's return
        async with self._lock:
            dead = sorted({i for g in lost for i in g.slots if i not in views})
            log.warning("slot(s) %s are gone; re-planning without their groups", dead)
            report = ReconfigReport(self.epoch, self.epoch + 1, describe(self.plan),
                                    error=f"slot(s) {dead} stopped answering")
            started = time.perf_counter()
            await self._recover(self.plan, report, forward="healed")
            report.seconds = time.perf_counter() - started
            self._finish(report)
            return report

    async def _restore(self, views: dict[int, SlotView]) -> ReconfigReport | None:
        """Re-apply the target once all its slots answer, if a group of it is not serving (a slot
        that was restarted holds no group yet, or the plan was cut down while it was away)."""
        target = self.target or self.plan
        if target is None or any(i not in views for g in target.groups for i in g.slots):
            return None  # a slot of the target is still away (restarting)
        serving = {g.key() for g in current_groups(views)}
        if all((g.role, tuple(g.slots)) in serving for g in target.groups):
            return None
        async with self._lock:
            log.warning("every slot of %s answers again; restoring it", describe(target))
            report = ReconfigReport(self.epoch, self.epoch + 1, describe(target))
            started = time.perf_counter()
            try:
                await self._apply_once(target, views, report)
                report.result = "restored"
            except Exception as e:
                log.exception("restoring %s failed", describe(target))
                report.attempts.append({"plan": describe(target), "error": str(e)})
                report.error = str(e)
                await self._recover(self.plan or target, report, forward="healed")
            report.seconds = time.perf_counter() - started
            self._finish(report)
            return report

    def _finish(self, report: ReconfigReport) -> None:
        self.history.append(report)
        self.history = self.history[-100:]
        for callback in self.on_report:
            callback(report)
        log.info("reconfiguration %d -> %d (%s): %s in %.3fs; bytes kept %d, from peers %d, from disk %d; "
                 "requests finished in place %d, migrated %d, parked %d", report.from_epoch, report.to_epoch,
                 report.plan, report.result, report.seconds, report.kept_bytes, report.peer_bytes,
                 report.disk_bytes, report.finished_in_place, report.migrated, report.parked)

    async def _recover(self, target: Plan, report: ReconfigReport, forward: str = "rolled_forward") -> None:
        views = await self.slot_views()
        old = self.plan
        for candidate, result in ((target, forward), (old, "rolled_back")):
            if candidate is None:
                continue
            live = [g for g in candidate.groups if all(s in views for s in g.slots)]
            try:
                fallback = Plan(groups=tuple(live), num_slots=candidate.num_slots)
            except ValueError:
                continue  # no prefill or no decode group left in it
            if candidate is target and len(live) == len(target.groups):
                result = "committed"  # every slot lives: the retry is the same plan
            try:
                report.plan = describe(fallback)
                await self._apply_once(fallback, views, report)
                report.result = result
                return
            except Exception as e:
                log.exception("recovery towards %s failed", describe(fallback))
                report.attempts.append({"plan": describe(fallback), "error": str(e)})
                views = await self.slot_views()
        report.result = "failed"

    async def _apply_once(self, plan: Plan, views: dict[int, SlotView], report: ReconfigReport) -> None:
        d = diff(plan, self.epoch + 1, views)
        report.to_epoch = d.epoch
        report.groups = [GroupReport(g.group_id, g.role, g.tp, list(g.slots), kept=True) for g in d.kept]
        if d.empty:
            report.result = "unchanged"
            self.plan = plan
            await self._resume_parked(views, d)
            return
        await self._publish(plan, reconfiguring=True)
        recut = Recut(self.slots, self.cluster, self.routing, self.settings, views, d, report)
        await recut.run()
        self.epoch, self.plan = d.epoch, plan
        self.routing.set_epoch(d.epoch)
        # Groups that went stay frozen: ids are per epoch, so a stale record is never routed to.
        await self._publish(plan, reconfiguring=False)
        report.groups += recut.group_reports()
        report.add_totals()
        await self._resume_parked(await self.slot_views(), d)

    async def _resume_parked(self, views: dict[int, SlotView], d: Any) -> None:
        holders = [v for v in views.values() if v.parked]
        if not holders:
            return
        records = {g.group_id: g for g in await self.cluster.groups()}
        decode = [(g.group_id, records[g.group_id].address) for g in d.target
                  if role_does_decode(g.role) and g.group_id in records]
        for v in holders:
            result = await self.slots.resume(v.address, decode, self.settings.step_timeout_s)
            if result.parked:
                raise ReconfigError(f"slot {v.index} still holds {result.parked} requests no decode group took")

    async def store_initial(self, plan: Plan) -> None:
        """Store the plan `bootstrap` brings the slots to (epoch 0: nothing formed yet)."""
        await self.cluster.set_plan(PlanDoc(0, plan.to_json()))

    async def _publish(self, plan: Plan, reconfiguring: bool) -> None:
        """The plan document: during a re-cut it names the new plan under the old epoch."""
        target = self.target or plan
        await self.cluster.set_plan(PlanDoc(self.epoch, plan.to_json(), target.to_json(), reconfiguring,
                                            applied=not reconfiguring))

    # ---- start-up -------------------------------------------------------------------------
    async def bootstrap(self, timeout_s: float = 300.0) -> ReconfigReport | None:
        """Bring the cluster to the plan stored in Redis (as `nitsum up` writes it), once its slots
        have registered; adopt what already serves when it matches (a restarted router)."""
        stored = await self.cluster.get_plan()
        if stored is None or not stored.plan:
            return None  # no plan for slots (static prefill/decode groups register themselves)
        plan = Plan.from_json(stored.plan)
        self.target = Plan.from_json(stored.target) if stored.target else plan
        views = await self.wait_for_slots(plan.num_slots, timeout_s)
        self.epoch = max(self.epoch, stored.epoch)
        current = current_groups(views)
        if current and {g.key() for g in current} == {(g.role, tuple(g.slots)) for g in plan.groups}:
            self.plan = plan
            self.epoch = max([self.epoch, *(g.epoch for g in current)])
            self.routing.set_epoch(self.epoch)
            log.info("adopted the serving plan %s at epoch %d", describe(plan), self.epoch)
            return None
        target = self.target
        report = await self.apply(plan)
        self.target = target  # the stored plan may be a degraded one: the target stays what was asked
        return report

    async def close(self) -> None:
        if self._own_channels:
            await self.slots.channels.close()


def parse_plan_input(text: str, num_slots: int | None) -> Plan:
    """A plan as the admin API and `nitsum plan apply` take it: JSON (Plan.to_json's form) or `p1,d2`."""
    text = text.strip()
    if text.startswith("{"):
        return Plan.from_json(text)
    return parse_plan(text, slots=num_slots)
