"""SLO tiers: the named classes of service every part of Nitsum speaks of.

A tier has a TTFT target, a TPOT target and a weight (its share of goodput when the planner
trades one tier against another). The gateway resolves each request to a tier, the router
orders and sheds by tier, the simulator reports per tier. Config files build these; the
defaults below are what `nitsum up` serves with no config.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tier:
    name: str
    ttft_s: float  # time-to-first-token target, seconds
    tpot_s: float  # time-per-output-token target (mean after the first), seconds
    weight: float = 1.0
    # Requests allowed to wait in this tier's queue before new ones get 429.
    queue_limit: int = 256
    # How long a request of this tier may wait before it is served ahead of higher tiers.
    max_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"tier name {self.name!r}: use letters, digits, '-' or '_'")
        for field in ("ttft_s", "tpot_s", "max_wait_s"):
            if getattr(self, field) <= 0:
                raise ValueError(f"tier {self.name}: {field} must be > 0, got {getattr(self, field)}")
        if self.weight <= 0:
            raise ValueError(f"tier {self.name}: weight must be > 0, got {self.weight}")
        if self.queue_limit < 1:
            raise ValueError(f"tier {self.name}: queue_limit must be >= 1, got {self.queue_limit}")

    def has_room(self, waiting: int) -> bool:
        """Whether a new request may join this tier's queue while `waiting` are in it (else 429)."""
        return waiting < self.queue_limit

    def met(self, ttft_s: float, tpot_s: float) -> bool:
        """Whether a finished request with these latencies counts towards goodput."""
        return ttft_s <= self.ttft_s and tpot_s <= self.tpot_s


DEFAULT_TIERS: tuple[Tier, ...] = (
    Tier("interactive", ttft_s=0.5, tpot_s=0.05, weight=4.0, queue_limit=128, max_wait_s=5.0),
    Tier("standard", ttft_s=2.0, tpot_s=0.1, weight=2.0, queue_limit=256, max_wait_s=30.0),
    Tier("batch", ttft_s=30.0, tpot_s=0.5, weight=1.0, queue_limit=1024, max_wait_s=600.0),
)
