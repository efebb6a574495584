"""The gateway's side of the mesh: readiness, admission to a tier queue, and a request's events.

Lifecycle of one request here: `ready()` (503 if no prefill or no decode group holds a lease)
-> `submit()` (429 if the tier's queue is at its limit, else XADD to the tier stream) ->
`events()` (XREAD the request's output stream until an event with a finish reason or an error)
-> `forget()`; `cancel()` when the client went away first.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from services.cluster import ClusterClient, GroupRecord
from services.config import GatewayConfig
from services.rpc import pb
from services.tasks import TaskSet

from .errors import ApiError, bad_request, internal, overloaded, timeout, unavailable

_READ_BLOCK_MS = 1000


class Upstream:
    def __init__(self, config: GatewayConfig, cluster: ClusterClient, tasks: TaskSet) -> None:
        self.config = config
        self.cluster = cluster
        self.tasks = tasks
        self._groups: list[GroupRecord] = []
        self._groups_at = float("-inf")
        self._max_len = 0  # the context length last served, kept through a reconfiguration

    async def groups(self, fresh: bool = False) -> list[GroupRecord]:
        now = time.monotonic()
        if fresh or now - self._groups_at > self.config.readiness_cache_s:
            self._groups = await self.cluster.groups()
            self._groups_at = now
        return self._groups

    async def ready(self) -> int:
        """The context length the ready groups serve, or 503 while a prefill or decode group is missing."""
        groups = await self.groups()
        missing = _missing_roles(groups)
        if missing:
            # The cached list may predate a reconfiguration's end; and during one, a role may be
            # missing for a moment: requests then wait in their queue for the new groups. Groups
            # register before the plan says the reconfiguration is over, so read them again after.
            groups = await self.groups(fresh=True)
            missing = _missing_roles(groups)
            if missing and self._max_len and not await self._reconfiguring():
                groups = await self.groups(fresh=True)
                missing = _missing_roles(groups)
            elif missing and self._max_len:
                missing = []
        if missing:
            raise unavailable(f"no {' or '.join(missing)} group is ready yet; retry shortly",
                              self.config.retry_after_s)
        lengths = [g.max_model_len for g in groups if g.max_model_len > 0]
        if lengths:
            self._max_len = min(lengths)
        return self._max_len or 1 << 30

    async def _reconfiguring(self) -> bool:
        """The cluster is being re-cut (router/orchestrator.py): a role may be missing for a moment,
        and requests wait in their tier queue for the new groups instead of failing."""
        stored = await self.cluster.get_plan()
        return stored is not None and bool(stored[1].get("reconfiguring"))

    async def submit(self, request: pb.QueuedRequest) -> None:
        tier = self.config.policy.tier(request.tier)
        depth = await self.cluster.queue_depth(tier.name)
        if depth >= tier.queue_limit:
            raise overloaded(f"tier {tier.name!r} has {depth} requests waiting (limit {tier.queue_limit}); "
                             "retry later", max(1.0, tier.ttft_s))
        await self.cluster.enqueue(request)

    async def events(self, request_id: str) -> AsyncIterator[pb.TokenEvent]:
        """Events of one request in order; raises ApiError for an error event or a timeout."""
        last_id = "0-0"
        started = time.monotonic()
        seen_first = False
        owner = ""  # the group now producing this request's events, once the prefill leader names it
        while True:
            limit = self.config.request_timeout_s if seen_first else self.config.first_event_timeout_s
            if time.monotonic() - started > limit:
                raise timeout(f"request {request_id} got no {'end' if seen_first else 'first token'} "
                              f"within {limit:.0f}s")
            entries = await self.cluster.read_output(request_id, last_id, _READ_BLOCK_MS)
            for entry_id, event in entries:
                last_id = entry_id
                if event.error.kind != pb.ERROR_KIND_UNSPECIFIED:
                    raise error_of(event.error, request_id)
                seen_first = True
                owner = event.next_group or owner
                yield event
                if event.finish_reason:
                    return
            if not entries and owner:
                await self._check_alive(owner, request_id)

    async def _check_alive(self, group_id: str, request_id: str) -> None:
        """A group whose lease expired will not send this request's remaining tokens: fail now
        (503, retry) instead of leaving the client waiting for the request timeout."""
        if group_id.startswith("slot:"):  # parked in a slot during a reconfiguration
            if any(s.slot_id == group_id for s in await self.cluster.slots()):
                return
        elif any(g.group_id == group_id for g in await self.groups()):
            return
        raise unavailable(f"request {request_id}: group {group_id} stopped answering mid-request; "
                          "retry the request", 1.0)

    def cancel(self, request_id: str) -> None:
        """Tell the router and the groups to drop the request (from a cancelled context: no await)."""
        self.tasks.spawn(self._cancel(request_id), name=f"cancel-{request_id}")

    async def _cancel(self, request_id: str) -> None:
        await self.cluster.cancel(request_id)
        await self.cluster.drop_output(request_id)

    def forget(self, request_id: str) -> None:
        self.tasks.spawn(self.cluster.drop_output(request_id), name=f"drop-{request_id}")


def _missing_roles(groups: list[GroupRecord]) -> list[str]:
    roles = {g.role for g in groups}
    return [r for r in ("prefill", "decode") if r not in roles]


def error_of(error: pb.Error, request_id: str) -> ApiError:
    if error.kind == pb.BAD_REQUEST:
        return bad_request(error.message)
    if error.kind == pb.OVERLOADED:
        return overloaded(error.message or "overloaded; retry later", error.retry_after_s or 1.0)
    if error.kind == pb.UNAVAILABLE:
        return unavailable(error.message or "no group can serve this now", error.retry_after_s or 1.0)
    return internal(request_id)
