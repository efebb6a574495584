"""What one reconfiguration did: per group the pause it saw and where its weight bytes came from,
requests finished in place, migrated and parked (`POST /admin/plan` answers it, the router logs it
and counts it in its metrics)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# How a reconfiguration ended: committed | unchanged | rolled_forward | rolled_back | healed |
# restored | failed (docs/adaptive-tp.md).
RESULTS = ("committed", "unchanged", "rolled_forward", "rolled_back", "healed", "restored", "failed")


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
    result: str = "committed"  # one of RESULTS
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

    def add_totals(self) -> None:
        self.kept_bytes = sum(g.kept_bytes for g in self.groups)
        self.peer_bytes = sum(g.peer_bytes for g in self.groups)
        self.disk_bytes = sum(g.disk_bytes for g in self.groups)
