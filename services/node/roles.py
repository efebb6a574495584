"""What a slot process hosts, given to it by the composition root (`nitsum slot`, slot_cli.py): the
leaders of the roles its groups may have, and the decode role's parking lot for requests taken out
of a group that went when no group that stays could take them. The slot knows the roles only
through these types: `services` never imports `prefill_node` or `decode_node`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from kvtransfer.base import KVHandoff
from services.config import NodeConfig
from services.metrics import NodeMetrics

from .frame import GroupLeader


class Parking(Protocol):
    """Requests parked in a slot between two plan epochs (their KV in host memory)."""

    def __len__(self) -> int: ...

    async def park(self, handoffs: list[KVHandoff], holder: str) -> None:
        """Keep these; their output streams name `holder` (the slot) as who holds them now."""

    async def resume(self, targets: list[tuple[str, str]]) -> tuple[int, int]:
        """Hand what is parked to these decode-capable groups ((group id, address)); (moved, still parked)."""

    async def close(self) -> None: ...


LeaderFactory = Callable[[NodeConfig, NodeMetrics], GroupLeader]


@dataclass(frozen=True)
class Roles:
    leaders: Mapping[str, LeaderFactory]  # role ("prefill" | "decode" | "colocated") -> its group leader
    parking: Parking
