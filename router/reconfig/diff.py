"""The pure part of a re-cut: which groups serve now, which the new plan keeps, which go, which
slots change and what each must hold. No I/O: the orchestrator gathers the slots' views and
carries out the diff (orchestrator.py)."""

from __future__ import annotations

from dataclasses import dataclass

from router.decide.plans import LETTER_OF_ROLE, Plan
from services.rpc import pb


@dataclass(frozen=True)
class ServingGroup:
    """A group of a plan epoch, as the live cluster knows it: its id, role and slots (rank order)."""

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
    """One slot as its `status` answered."""

    index: int
    address: str
    held: tuple[int, int] | None  # (tp, rank) of the shard it holds
    group: pb.Assignment | None
    serving: bool
    parked: int
    held_bytes: int = 0


@dataclass(frozen=True)
class PlanDiff:
    epoch: int  # the new plan's
    target: list[ServingGroup]
    kept: list[ServingGroup]  # serve throughout, under their old ids
    new: list[ServingGroup]
    gone: list[ServingGroup]
    changed: list[int]  # slots that stop serving and are re-cut
    need: dict[int, tuple[int, int]]  # slot -> (tp, rank) it must hold and does not yet

    @property
    def empty(self) -> bool:
        return not self.new and not self.gone and not self.changed

    @property
    def needs_store(self) -> bool:
        return bool(self.need) or any(g.tp > 1 for g in self.new)


def diff(plan: Plan, epoch: int, views: dict[int, SlotView]) -> PlanDiff:
    """Move the slots in `views` to `plan` as epoch `epoch`."""
    current = current_groups(views)
    target = groups_of(plan, epoch, current)
    new = [g for g in target if g not in current]
    gone = [g for g in current if g not in target]
    changed = sorted({i for g in new for i in g.slots} | {i for g in gone for i in g.slots}
                     | {i for i, v in views.items() if v.serving and not any(i in g.slots for g in current)})
    layouts = {i: (g.tp, r) for g in new for r, i in enumerate(g.slots)}
    need = {i: lay for i, lay in layouts.items() if views[i].held != lay}
    return PlanDiff(epoch, target, [g for g in target if g in current], new, gone, changed, need)


def groups_of(plan: Plan, epoch: int, current: list[ServingGroup]) -> list[ServingGroup]:
    """The plan's groups, named: a group identical to a serving one keeps that one's id and epoch."""
    serving = {g.key(): g for g in current}
    out = []
    for g in plan.groups:
        key = (g.role, tuple(g.slots))
        if key in serving:
            out.append(serving[key])
        else:
            out.append(ServingGroup(f"{LETTER_OF_ROLE[g.role]}{g.slots[0]}-e{epoch}", g.role, tuple(g.slots), epoch))
    return out


def current_groups(slots: dict[int, SlotView]) -> list[ServingGroup]:
    """Groups whose every rank reports serving in them."""
    members: dict[str, dict[int, int]] = {}
    info: dict[str, pb.Assignment] = {}
    for s in slots.values():
        if s.group is None or not s.serving:
            continue
        members.setdefault(s.group.group_id, {})[s.group.rank] = s.index
        info[s.group.group_id] = s.group
    out = []
    for gid, ranks in members.items():
        g = info[gid]
        if sorted(ranks) == list(range(g.tp)):
            out.append(ServingGroup(gid, g.role, tuple(ranks[r] for r in range(len(ranks))), g.epoch))
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
