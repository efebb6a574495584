"""Plans: how the slots are cut into TP groups, and what each group does.

The compact text form is used everywhere (CLI, logs, explanations): `p1,d2` is a prefill group
of TP 1 on slot 0 and a decode group of TP 2 on slots 1-2; slots are handed out in order.
`c4` is a colocated group (prefill and decode on the same replica, the vLLM-like layout; the
baselines use it, and the mesh serves it like the other two). The JSON form names the slots explicitly and carries the plan's epoch, which is
what the cluster stores and what every plan-dependent message carries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from router.decide.scheduler import (
    ROLE_COLOCATED,
    ROLE_DECODE,
    ROLE_PREFILL,
    role_does_decode,
    role_does_prefill,
)

ROLE_LETTERS = {"p": ROLE_PREFILL, "d": ROLE_DECODE, "c": ROLE_COLOCATED}
LETTER_OF_ROLE = {v: k for k, v in ROLE_LETTERS.items()}
TP_DEGREES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Group:
    role: str
    slots: tuple[int, ...]

    @property
    def tp(self) -> int:
        return len(self.slots)

    @property
    def does_prefill(self) -> bool:
        return role_does_prefill(self.role)

    @property
    def does_decode(self) -> bool:
        return role_does_decode(self.role)

    def to_str(self) -> str:
        return f"{LETTER_OF_ROLE[self.role]}{self.tp}"


@dataclass(frozen=True)
class Plan:
    groups: tuple[Group, ...]
    epoch: int = 0
    # Slots are counted here so that a plan can leave some idle (e.g. a failed device).
    num_slots: int = field(default=0)

    def __post_init__(self) -> None:
        _validate(self.groups, self.num_slots or None)
        if not self.num_slots:
            object.__setattr__(self, "num_slots", sum(g.tp for g in self.groups))

    def to_str(self) -> str:
        return ",".join(g.to_str() for g in self.groups)

    def to_json(self) -> str:
        return json.dumps({"epoch": self.epoch, "num_slots": self.num_slots,
                           "groups": [{"role": g.role, "tp": g.tp, "slots": list(g.slots)}
                                      for g in self.groups]})

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            doc = json.loads(text)
            groups = tuple(Group(role=str(g["role"]), slots=tuple(int(s) for s in g["slots"]))
                           for g in doc["groups"])
            for g, raw in zip(groups, doc["groups"], strict=True):
                if "tp" in raw and int(raw["tp"]) != g.tp:
                    raise ValueError(f"group on slots {list(g.slots)} says tp {raw['tp']}")
            return cls(groups=groups, epoch=int(doc.get("epoch", 0)),
                       num_slots=int(doc.get("num_slots", 0)))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"plan JSON is malformed: {exc}") from exc

    def with_epoch(self, epoch: int) -> Plan:
        return Plan(groups=self.groups, epoch=epoch, num_slots=self.num_slots)

    def same_layout(self, other: Plan) -> bool:
        return self.groups == other.groups


def parse_plan(text: str, slots: int | None = None, epoch: int = 0) -> Plan:
    """Parse `p1,d2`-style text; `slots` (if given) is how many slots the cluster has."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("plan is empty: write groups like 'p1,d2' (role letter p/d/c + TP degree)")
    groups: list[Group] = []
    next_slot = 0
    for part in parts:
        letter, digits = part[0].lower(), part[1:]
        if letter not in ROLE_LETTERS:
            raise ValueError(f"plan group {part!r}: unknown role {letter!r}; use p (prefill), "
                             "d (decode) or c (colocated)")
        if not digits.isdigit():
            raise ValueError(f"plan group {part!r}: TP degree must follow the role letter, e.g. 'd2'")
        tp = int(digits)
        if tp not in TP_DEGREES:
            raise ValueError(f"plan group {part!r}: TP {tp} is not a power of two in {TP_DEGREES}")
        groups.append(Group(ROLE_LETTERS[letter], tuple(range(next_slot, next_slot + tp))))
        next_slot += tp
    return Plan(groups=tuple(groups), epoch=epoch, num_slots=slots or 0)


def _validate(groups: tuple[Group, ...], slots: int | None) -> None:
    if not groups:
        raise ValueError("a plan needs at least one group")
    used: list[int] = []
    for g in groups:
        if g.role not in LETTER_OF_ROLE:
            raise ValueError(f"unknown role {g.role!r}; use prefill, decode or colocated")
        if g.tp not in TP_DEGREES:
            raise ValueError(f"group on slots {list(g.slots)}: TP {g.tp} is not a power of two in {TP_DEGREES}")
        used.extend(g.slots)
    if len(set(used)) != len(used):
        raise ValueError(f"plan puts a slot in two groups: {sorted(used)}")
    if not any(g.does_prefill for g in groups):
        raise ValueError("plan has no prefill group (add a 'p' or 'c' group)")
    if not any(g.does_decode for g in groups):
        raise ValueError("plan has no decode group (add a 'd' or 'c' group)")
    if slots is not None and (len(used) > slots or max(used) >= slots):
        raise ValueError(f"plan uses {len(used)} slots (up to slot {max(used)}) but only {slots} are available")


def enumerate_plans(slots: int, min_tp: int = 1, max_tp: int = 8,
                    roles: str = "pdc") -> list[Plan]:
    """Every plan that uses all `slots`: groups of power-of-two TP in [min_tp, max_tp], each a role.

    Groups are listed biggest first, and within a size by role letter, so two plans that differ
    only in the order of identical groups are one plan.
    """
    sizes = [t for t in TP_DEGREES if min_tp <= t <= max_tp]
    plans: list[Plan] = []
    for partition in _partitions(slots, sorted(sizes, reverse=True)):
        for letters in _role_multisets(partition, roles):
            text = ",".join(f"{r}{tp}" for tp, r in zip(partition, letters, strict=True))
            try:
                plans.append(parse_plan(text, slots))
            except ValueError:
                continue  # e.g. all-prefill: not a servable plan
    return plans


def _partitions(n: int, sizes: list[int]) -> list[list[int]]:
    if n == 0:
        return [[]]
    out: list[list[int]] = []
    for i, s in enumerate(sizes):
        if s <= n:
            out.extend([s] + rest for rest in _partitions(n - s, sizes[i:]))
    return out


def _role_multisets(partition: list[int], roles: str) -> list[list[str]]:
    """Role letters for each group, non-decreasing within a run of equal sizes."""
    out: list[list[str]] = [[]]
    for i, tp in enumerate(partition):
        nxt: list[list[str]] = []
        for prefix in out:
            floor = prefix[-1] if i > 0 and partition[i - 1] == tp else ""
            nxt.extend(prefix + [r] for r in sorted(roles) if r >= floor)
        out = nxt
    return out
