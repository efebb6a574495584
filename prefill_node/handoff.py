"""One request's prefill -> decode hand-off, with failover: if the decode group the router chose
fails to take the KV (its process died mid-transfer, it timed out, it refused), the same KV goes to
another decode group instead, so the request completes elsewhere and is never lost.

`fail_over` is the loop, for any way of moving the KV (the gathered bytes over gRPC, or the block
path of kv_send.py); `hand_off` runs it over a `KVBackend`.

Lifecycle: send to the router's choice -> DONE: done. FAILED (not cancelled, not the client's
fault) -> pick another live decode group (`pick_decode_group`: the router's own placement rule)
-> name it on the request's stream (`redirect`: the router and the gateway follow the group that
holds the request) -> send again; at most `max_attempts` groups. The caller holds the KV (a `KVExport`, already out of
its cache) for the whole hand-off and drops it afterwards, so nothing stays allocated on the
prefill side; a decode group frees what it allocated for a transfer that did not complete
(`add_prefilled` aborts), and a dead one takes its memory with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from kvtransfer.base import KVBackend, KVHandoff
from kvtransfer.state import TransferState
from router.decide.scheduler import GroupState, PendingRequest, decode_group_for, role_does_decode
from services.cluster.schema import GroupRecord
from services.metrics import NodeMetrics
from services.rpc import pb

log = logging.getLogger(__name__)

# Failures that another decode group would see too: do not fail over.
_FINAL_KINDS = (pb.CANCELLED, pb.BAD_REQUEST)


@dataclass(frozen=True)
class DecodeTarget:
    group_id: str
    address: str


@dataclass
class HandoffResult:
    target: DecodeTarget | None  # where the KV landed; None when every attempt failed
    error: pb.Error | None = None  # the last failure, when target is None
    failures: list[tuple[str, pb.Error]] = field(default_factory=list)  # (group_id, why) per failed attempt
    seconds: float = 0.0
    bytes_sent: int = 0
    last_tried: DecodeTarget | None = None  # the group the request's stream names now


def failure_reason(err: pb.Error) -> str:
    """The metrics label of a failed transfer: its error kind in lower case."""
    return pb.ErrorKind.Name(err.kind).lower()


def pick_decode_group(groups: Sequence[GroupRecord], tried: set[str], epoch: int,
                      request: pb.QueuedRequest) -> DecodeTarget | None:
    """The live decode-capable group (decode or colocated) to fail over to, by the router's placement
    rule: not tried yet, with room for the request, the request's epoch first, then the fewest
    running per TP rank."""
    live = {g.group_id: g for g in groups if role_does_decode(g.role) and g.address and g.group_id not in tried}
    context = len(request.prompt_ids) + len(request.resume_ids)
    need = PendingRequest(request.request_id, request.tier, request.arrival_s, context,
                          request.sampling.max_tokens - len(request.resume_ids))
    states = [GroupState(g.group_id, g.role, g.tp, g.free_kv_blocks, g.block_size, g.running, g.max_running)
              for g in live.values()]
    best = decode_group_for(need, states, {g.group_id for g in live.values() if g.epoch == epoch})
    return None if best is None else DecodeTarget(best, live[best].address)


Attempt = Callable[[DecodeTarget], Awaitable[pb.Error | None]]


async def fail_over(attempt: Attempt, first: DecodeTarget,
                    find_other: Callable[[set[str]], Awaitable[DecodeTarget | None]],
                    redirect: Callable[[DecodeTarget], Awaitable[None]], metrics: NodeMetrics,
                    max_attempts: int = 3, request_id: str = "") -> HandoffResult:
    """Run `attempt` (one hand-off to one decode group: None when it took the request, else why
    not) on `first`, then on other decode groups while it fails; never raises for a failed one."""
    result = HandoffResult(None)
    target: DecodeTarget | None = first
    tried: set[str] = set()
    started = time.perf_counter()
    while target is not None:
        tried.add(target.group_id)
        result.last_tried = target
        err = await attempt(target)
        if err is None:
            result.target = target
            break
        result.failures.append((target.group_id, err))
        result.error = err
        metrics.kv_transfer_failures.labels(failure_reason(err)).inc()
        if err.kind in _FINAL_KINDS or len(tried) >= max_attempts:
            break
        target = await find_other(tried)
        if target is None:
            break
        log.warning("KV hand-off of %s to %s failed (%s); handing it to %s instead", request_id,
                    result.failures[-1][0], err.message, target.group_id)
        metrics.kv_handoff_failovers.inc()
        await redirect(target)
    result.seconds = time.perf_counter() - started
    if result.target is None:
        log.error("KV hand-off of %s failed on %s", request_id,
                  ", ".join(f"{g}: {e.message}" for g, e in result.failures))
    return result


async def hand_off(backend: KVBackend, handoff: KVHandoff, first: DecodeTarget,
                   find_other: Callable[[set[str]], Awaitable[DecodeTarget | None]],
                   redirect: Callable[[DecodeTarget], Awaitable[None]], metrics: NodeMetrics,
                   max_attempts: int = 3) -> HandoffResult:
    """Send `handoff` (its KV gathered as bytes) to `first` over `backend`, failing over to other
    decode groups; never raises for a failed transfer (the result says what happened)."""
    sent = 0

    async def attempt(target: DecodeTarget) -> pb.Error | None:
        nonlocal sent
        sender = backend.sender(target.address)
        sender.send(handoff)
        state = await sender.wait()
        metrics.kv_transfer_seconds.observe(getattr(sender, "seconds", 0.0))
        sent += getattr(sender, "bytes_sent", 0)
        metrics.kv_transfer_bytes.labels("sent").inc(getattr(sender, "bytes_sent", 0))
        if state is TransferState.DONE:
            return None
        return sender.error or pb.Error(kind=pb.INTERNAL, message="KV transfer failed")

    result = await fail_over(attempt, first, find_other, redirect, metrics, max_attempts,
                             handoff.request.request_id)
    result.bytes_sent = sent
    return result
