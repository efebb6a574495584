"""Migrating taken-out requests to another decode group, and parking the ones none takes.

A request taken out of a decode group (its KV of every token, its tokens and sampling parameters
with the seed: `kvtransfer.base.KVHandoff`) goes to the first target group that admits it; its
output stream then names that group as its holder, so the router and the gateway follow it. What
no target takes is parked in the slot (`ParkingLot`, the slot's `Parking`) until the next epoch's
decode groups are up: the slot's `resume` hands it over the same way."""

from __future__ import annotations

import logging
import time

from kvtransfer.base import KVHandoff, TransferState
from kvtransfer.grpc_backend import GrpcKVBackend
from services.cluster import ClusterClient
from services.config import RedisSettings
from services.rpc import pb

log = logging.getLogger("nitsum.decode")


class Migrator:
    def __init__(self, cluster: ClusterClient, chunk_bytes: int = 4 << 20) -> None:
        self.cluster = cluster
        self._chunk_bytes = chunk_bytes
        self._backend: GrpcKVBackend | None = None

    async def send(self, handoff: KVHandoff, targets: list[tuple[str, str]]) -> bool:
        """Hand one taken-out request to the first of `targets` ((group id, address)) that admits it."""
        if self._backend is None:
            self._backend = GrpcKVBackend(self._chunk_bytes)
        for group_id, address in targets:
            sender = self._backend.sender(address)
            sender.send(handoff)
            if await sender.wait() is TransferState.DONE:
                log.info("migrated %s to %s (%d tokens of KV)", handoff.request.request_id, group_id,
                         handoff.kv.num_tokens)
                await self.name_holder(handoff, group_id)
                return True
        return False

    async def name_holder(self, handoff: KVHandoff, holder: str) -> None:
        """Its output stream (and the in-flight ledger) names who holds the request now."""
        await self.cluster.emit(handoff.request.request_id, pb.TokenEvent(time_s=time.time(), next_group=holder,
                                                                          attempt=handoff.request.attempt))

    async def close(self) -> None:
        if self._backend is not None:
            await self._backend.close()


class ParkingLot:
    """Requests a slot keeps between two plan epochs (services.node.roles.Parking)."""

    def __init__(self, redis: RedisSettings) -> None:
        self.cluster = ClusterClient(redis.url, redis.prefix)
        self.migrator = Migrator(self.cluster)
        self.parked: list[KVHandoff] = []

    def __len__(self) -> int:
        return len(self.parked)

    async def park(self, handoffs: list[KVHandoff], holder: str) -> None:
        for handoff in handoffs:
            self.parked.append(handoff)
            await self.migrator.name_holder(handoff, holder)

    async def resume(self, targets: list[tuple[str, str]]) -> tuple[int, int]:
        """Spread the parked requests over `targets`, each to the first (from its own start) that takes it."""
        moved, kept = 0, []
        for i, handoff in enumerate(self.parked):
            if await self.migrator.send(handoff, targets[i % len(targets):] + targets[: i % len(targets)]):
                moved += 1
            else:
                kept.append(handoff)
        self.parked = kept
        return moved, len(kept)

    async def close(self) -> None:
        await self.migrator.close()
        await self.cluster.close()
