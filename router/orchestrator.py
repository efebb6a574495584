"""The orchestrator: moves the cluster from plan epoch e to e+1 while it serves.

It runs inside the leading router (it must stop and restart routing to the groups it re-cuts) and
drives the slot processes (services/node/slot.py) over their SlotControl service:

1. diff: a group of the new plan with the same role on the same slots as a serving group is kept
   (it serves throughout, under its old id); every other group goes, and its slots are re-cut;
2. freeze: the router stops routing to the groups that go and waits for its dispatches to them;
3. drain: each decode group that goes lets requests near their end finish and migrates the rest
   (KV, generated tokens, sampler state) to a decode group that stays, or parks them in its slot;
4. release: the slots that change stop serving, keeping their weights;
5. reshard: each slot whose (TP degree, rank) changes keeps the bytes it holds, fetches the rest
   from peer slots, and reads from the checkpoint only what no peer holds (services/engine/reshard);
   a role switch with an unchanged shard moves no bytes;
6. activate: the new groups form their process groups (one TCPStore per transition, a key prefix
   per group) and register; once all are ready the router switches to epoch e+1 and parked
   requests go to the new decode groups.

Every reconfiguration is accounted for (`ReconfigReport`): per group the pause it saw, bytes kept
/ from peers / from disk, requests finished in place, migrated and parked. A reconfiguration that
fails half-way (a slot dies, a fetch times out) is retried once towards a valid plan made of live
slots: the new plan without the groups that lost a slot (rolled forward), else the old one
(rolled back); a plan with no prefill or no decode group is never applied.

The plan asked for (at start, or by `apply`) is the target: when a slot dies while serving,
`heal` re-plans without its groups (their requests are resumed elsewhere, router/recovery.py), and
once every slot of the target answers again (`nitsum up` restarts a dead slot) it brings the
cluster back to the target ("restored").
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import grpc

from router.plans import LETTER_OF_ROLE, Group, Plan, parse_plan
from services.cluster import ClusterClient
from services.rpc import pb, pb_grpc

log = logging.getLogger("nitsum.orchestrator")


class PlanError(ValueError):
    """A plan that cannot be applied to this cluster (the caller's fault: HTTP 400)."""


class ReconfigError(RuntimeError):
    """A step of a reconfiguration failed."""


@dataclass(frozen=True)
class GroupSpec:
    group_id: str
    role: str
    slots: tuple[int, ...]
    epoch: int

    @property
    def tp(self) -> int:
        return len(self.slots)

    def key(self) -> tuple[str, tuple[int, ...]]:
        return self.role, self.slots


@dataclass
class SlotView:
    index: int
    address: str
    held: tuple[int, int] | None
    group: dict[str, Any] | None
    serving: bool
    parked: int
    held_bytes: int = 0


@dataclass
class GroupReport:
    group_id: str
    role: str
    tp: int
    slots: list[int]
    kept: bool
    pause_s: float = 0.0
    kept_bytes: int = 0
    peer_bytes: int = 0
    disk_bytes: int = 0


@dataclass
class ReconfigReport:
    from_epoch: int
    to_epoch: int
    plan: str
    result: str = "committed"  # committed | unchanged | rolled_forward | rolled_back | healed | restored | failed
    seconds: float = 0.0
    groups: list[GroupReport] = field(default_factory=list)
    kept_bytes: int = 0
    peer_bytes: int = 0
    disk_bytes: int = 0
    finished_in_place: int = 0
    migrated: int = 0
    parked: int = 0
    error: str = ""
    steps: dict[str, float] = field(default_factory=dict)  # seconds per step: freeze, drain, release, ...
    attempts: list[dict[str, Any]] = field(default_factory=list)  # a failed attempt before a rollback

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def groups_of(plan: Plan, epoch: int, current: list[GroupSpec]) -> list[GroupSpec]:
    """The plan's groups, named: a group identical to a serving one keeps that one's id and epoch."""
    serving = {g.key(): g for g in current}
    out = []
    for g in plan.groups:
        key = (g.role, tuple(g.slots))
        if key in serving:
            out.append(serving[key])
        else:
            out.append(GroupSpec(f"{LETTER_OF_ROLE[g.role]}{g.slots[0]}-e{epoch}", g.role, tuple(g.slots), epoch))
    return out


def current_groups(slots: dict[int, SlotView]) -> list[GroupSpec]:
    """Groups whose every rank reports serving in them."""
    members: dict[str, dict[int, int]] = {}
    info: dict[str, dict[str, Any]] = {}
    for s in slots.values():
        if s.group is None or not s.serving:
            continue
        members.setdefault(s.group["group_id"], {})[int(s.group["rank"])] = s.index
        info[s.group["group_id"]] = s.group
    out = []
    for gid, ranks in members.items():
        g = info[gid]
        if sorted(ranks) == list(range(int(g["tp"]))):
            out.append(GroupSpec(gid, str(g["role"]), tuple(ranks[r] for r in range(len(ranks))), int(g["epoch"])))
    return sorted(out, key=lambda g: g.slots)


def describe(plan: Plan) -> str:
    """`p2,d2` when the groups take the slots in order from 0, else with the slots: `p1@0,d2@2-3`."""
    expected = 0
    for g in plan.groups:
        if g.slots != tuple(range(expected, expected + g.tp)):
            return ",".join(f"{g.to_str()}@{_slots(g.slots)}" for g in plan.groups)
        expected += g.tp
    return plan.to_str()


def _slots(slots: tuple[int, ...]) -> str:
    if slots == tuple(range(slots[0], slots[0] + len(slots))) and len(slots) > 1:
        return f"{slots[0]}-{slots[-1]}"
    return "+".join(map(str, slots))


class SlotClient:
    def __init__(self) -> None:
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.SlotControlStub]] = {}

    async def call(self, address: str, verb: str, args: dict[str, Any] | None = None,
                   timeout_s: float = 120.0) -> dict[str, Any]:
        if address not in self._channels:
            channel = grpc.aio.insecure_channel(address)
            self._channels[address] = (channel, pb_grpc.SlotControlStub(channel))
        stub = self._channels[address][1]
        try:
            reply = await stub.Command(pb.SlotCommand(verb=verb, args_json=json.dumps(args or {})), timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            raise ReconfigError(f"slot at {address}: {verb}: {e.code().name} {e.details() or ''}".strip()) from e
        if reply.error.kind != pb.ERROR_KIND_UNSPECIFIED:
            raise ReconfigError(reply.error.message)
        result: dict[str, Any] = json.loads(reply.result_json or "{}")
        return result

    async def close(self) -> None:
        for channel, _ in self._channels.values():
            await channel.close()
        self._channels.clear()


class RoutingControl(Protocol):
    """What the orchestrator needs from the router (router.service.Router implements it)."""

    def freeze(self, group_ids: set[str]) -> None: ...
    def unfreeze(self, group_ids: set[str]) -> None: ...
    def set_epoch(self, epoch: int) -> None: ...
    async def wait_idle(self, group_ids: set[str], timeout_s: float) -> None: ...


@dataclass
class OrchestratorSettings:
    finish_within: int = 16  # a decode request this close to its end finishes in place
    drain_wait_s: float = 5.0  # then the rest migrates
    step_timeout_s: float = 120.0


class Orchestrator:
    def __init__(self, cluster: ClusterClient, routing: RoutingControl,
                 settings: OrchestratorSettings | None = None) -> None:
        self.cluster = cluster
        self.routing = routing
        self.settings = settings or OrchestratorSettings()
        self.slots = SlotClient()
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
        records = [r for r in await self.cluster.slots() if r.index >= 0 and r.address]

        async def status(address: str) -> dict[str, Any] | None:
            try:
                return await self.slots.call(address, "status", timeout_s=5.0)
            except ReconfigError:
                return None

        replies = await asyncio.gather(*(status(r.address) for r in records))
        views = {}
        for r, s in zip(records, replies, strict=True):
            if s is not None:
                views[r.index] = SlotView(r.index, r.address, (int(s["held"][0]), int(s["held"][1])) if s["held"] else None,
                                          s["group"], bool(s["serving"]), int(s["parked"]), int(s["held_bytes"]))
        return views

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
                "slots": [{"index": v.index, "held": v.held, "group": v.group["group_id"] if v.group else None,
                           "parked": v.parked} for v in sorted(views.values(), key=lambda v: v.index)]}

    # ---- applying a plan ------------------------------------------------------------------
    def check(self, plan: Plan, views: dict[int, SlotView]) -> None:
        unknown = sorted(s for g in plan.groups for s in g.slots if s not in views)
        if unknown:
            raise PlanError(f"plan uses slot {unknown[0]}, which is not registered (live slots: "
                            f"{sorted(views) or 'none'})")
        for g in plan.groups:
            if g.role not in ("prefill", "decode"):
                raise PlanError(f"group on slots {list(g.slots)}: role {g.role!r}; slots serve prefill (p) or decode (d)")

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
        if not any(g.role == "prefill" for g in live) or not any(g.role == "decode" for g in live):
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
        s = self.settings
        current = current_groups(views)
        epoch = self.epoch + 1
        target = groups_of(plan, epoch, current)
        kept = [g for g in target if g in current]
        new = [g for g in target if g not in current]
        gone = [g for g in current if g not in target]
        changed = sorted({i for g in new for i in g.slots} | {i for g in gone for i in g.slots}
                         | {i for i, v in views.items() if v.serving and not any(i in g.slots for g in current)})
        report.to_epoch = epoch
        report.groups = [GroupReport(g.group_id, g.role, g.tp, list(g.slots), kept=True) for g in kept]
        if not new and not gone and not changed:
            report.result = "unchanged"
            self.plan = plan
            await self._resume_parked(views, target)
            return
        t0 = time.perf_counter()
        gone_ids = {g.group_id for g in gone}
        self.routing.freeze(gone_ids)
        await self._publish(plan, epoch, reconfiguring=True)
        mark = t0

        def step(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            report.steps[name] = round(report.steps.get(name, 0.0) + now - mark, 4)
            mark = now

        try:
            await self.routing.wait_idle(gone_ids, s.step_timeout_s)
            step("freeze")
            records = {g.group_id: g for g in await self.cluster.groups()}
            stay = [(g.group_id, records[g.group_id].address) for g in kept
                    if g.role == "decode" and g.group_id in records]
            drains = await asyncio.gather(*(
                self.slots.call(views[g.slots[0]].address, "drain",
                                {"finish_within": s.finish_within, "wait_s": s.drain_wait_s, "targets": stay},
                                s.step_timeout_s) for g in gone))
            for d in drains:
                report.finished_in_place += int(d.get("finished", 0))
                report.migrated += int(d.get("migrated", 0))
                report.parked += int(d.get("parked", 0))
            step("drain")
            await asyncio.gather(*(self.slots.call(views[i].address, "release", timeout_s=s.step_timeout_s)
                                   for i in changed))
            step("release")
            layouts = {i: (g.tp, r) for g in new for r, i in enumerate(g.slots)}
            store = ""
            need = {i: lay for i, lay in layouts.items() if views[i].held != lay}
            stats: dict[int, dict[str, Any]] = {}
            if need or any(g.tp > 1 for g in new):
                store = (await self.slots.call(views[changed[0]].address, "open_store"))["addr"]
            if need:
                held = {i: views[i].held for i in changed if views[i].held is not None}
                participants = sorted(set(held) | set(need))
                args = {"store": store, "prefix": f"e{epoch}/reshard/",
                        "held": {str(i): held[i] for i in held}, "need": {str(i): need[i] for i in need}}
                replies = await asyncio.gather(*(self.slots.call(views[i].address, "reshard", args, s.step_timeout_s)
                                                 for i in participants))
                stats = dict(zip(participants, replies, strict=True))
            step("reshard")
            ready: dict[str, float] = {}

            async def activate(g: GroupSpec) -> None:
                await asyncio.gather(*(self.slots.call(views[i].address, "activate", {
                    "epoch": epoch, "group_id": g.group_id, "role": g.role, "tp": g.tp, "rank": r,
                    "store": store, "prefix": f"e{epoch}/{g.group_id}/"}, s.step_timeout_s)
                    for r, i in enumerate(g.slots)))
                ready[g.group_id] = time.perf_counter() - t0

            await asyncio.gather(*(activate(g) for g in new))
            step("activate")
            self.epoch, self.plan = epoch, plan
            self.routing.set_epoch(epoch)
        except BaseException:
            self.routing.unfreeze(gone_ids)  # the recovery decides again from what still serves
            raise
        # Groups that went stay frozen: ids are per epoch, so a stale record is never routed to.
        await self._publish(plan, epoch, reconfiguring=False)
        for g in new:
            r = GroupReport(g.group_id, g.role, g.tp, list(g.slots), kept=False, pause_s=ready[g.group_id])
            for i in g.slots:
                st = stats.get(i)
                if st is None:  # unchanged shard (a role switch): every byte stays in place
                    r.kept_bytes += views[i].held_bytes
                else:
                    r.kept_bytes += int(st["kept_bytes"])
                    r.peer_bytes += int(st["peer_bytes"])
                    r.disk_bytes += int(st["disk_bytes"])
            report.groups.append(r)
        report.kept_bytes = sum(g.kept_bytes for g in report.groups)
        report.peer_bytes = sum(g.peer_bytes for g in report.groups)
        report.disk_bytes = sum(g.disk_bytes for g in report.groups)
        fresh = await self.slot_views()
        await self._resume_parked(fresh, target)

    async def _resume_parked(self, views: dict[int, SlotView], target: list[GroupSpec]) -> None:
        holders = [v for v in views.values() if v.parked]
        if not holders:
            return
        records = {g.group_id: g for g in await self.cluster.groups()}
        decode = [(g.group_id, records[g.group_id].address) for g in target
                  if g.role == "decode" and g.group_id in records]
        for v in holders:
            result = await self.slots.call(v.address, "resume", {"targets": decode}, self.settings.step_timeout_s)
            if result.get("parked"):
                raise ReconfigError(f"slot {v.index} still holds {result['parked']} requests no decode group took")

    async def store_initial(self, plan: Plan) -> None:
        """Store the plan `bootstrap` brings the slots to (epoch 0: nothing formed yet)."""
        await self.cluster.set_plan(0, self._plan_doc(plan, reconfiguring=False) | {"applied": False})

    def _plan_doc(self, plan: Plan, reconfiguring: bool) -> dict[str, Any]:
        target = self.target or plan
        return {"text": describe(plan), "groups": _groups_doc(plan), "num_slots": plan.num_slots,
                "reconfiguring": reconfiguring, "applied": not reconfiguring, "target": _groups_doc(target)}

    async def _publish(self, plan: Plan, epoch: int, reconfiguring: bool) -> None:
        await self.cluster.set_plan(epoch if not reconfiguring else self.epoch, self._plan_doc(plan, reconfiguring))

    # ---- start-up -------------------------------------------------------------------------
    async def bootstrap(self, timeout_s: float = 300.0) -> ReconfigReport | None:
        """Bring the cluster to the plan stored in Redis (as `nitsum up` writes it), once its slots
        have registered; adopt what already serves when it matches (a restarted router)."""
        stored = await self.cluster.get_plan()
        if stored is None:
            return None
        epoch, doc = stored
        text = doc.get("text", "")
        if not text or not doc.get("num_slots"):
            return None  # no plan for slots (static prefill/decode groups register themselves)
        num_slots = int(doc["num_slots"])
        plan = _plan_of(doc["groups"], num_slots) if doc.get("groups") else parse_plan(text, slots=num_slots)
        self.target = _plan_of(doc["target"], num_slots) if doc.get("target") else plan
        views = await self.wait_for_slots(plan.num_slots, timeout_s)
        self.epoch = max(self.epoch, epoch)
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
        await self.slots.close()


def _groups_doc(plan: Plan) -> list[dict[str, Any]]:
    return [{"role": g.role, "tp": g.tp, "slots": list(g.slots)} for g in plan.groups]


def _plan_of(groups: list[dict[str, Any]], num_slots: int) -> Plan:
    return Plan(groups=tuple(Group(str(g["role"]), tuple(int(i) for i in g["slots"])) for g in groups),
                num_slots=num_slots)


def parse_plan_input(text: str, num_slots: int | None) -> Plan:
    """A plan as the admin API and `nitsum plan apply` take it: JSON (Plan.to_json's form) or `p1,d2`."""
    text = text.strip()
    if text.startswith("{"):
        return Plan.from_json(text)
    return parse_plan(text, slots=num_slots)
