"""Block-level KV transfer between rank processes: `make_agent` picks a backend (`nixl` over UCX,
or the portable socket fallback in `local_backend`) for the interface of `agent_base`.

This sits below `kvtransfer.base` (which moves one request's gathered KV): here each rank process
moves byte ranges of its own cache tensor straight into a peer rank's cache tensor, as planned by
`kvtransfer.remap`.

Lifecycle, per rank process:
1. `agent = make_agent("auto", name, cache)` registers the whole cache tensor once.
2. `agent.metadata()` -> bytes to publish through any channel (a Redis key, a gRPC field, a pipe);
   each peer calls `agent.add_peer(those_bytes)`.
3. Sending side: `t = agent.send(peer, descs, transfer_id, timeout_s)` returns at once; the data
   is written into the peer's cache (one-sided WRITE) and the peer is told when it has landed.
   Receiving side: `r = agent.receive(transfer_id, timeout_s)`.
4. Both sides call `poll()` (it never blocks for long; the step loop also calls
   `agent.progress()` once per step): BOOTSTRAPPING (the peer's metadata is not loaded yet)
   -> TRANSFERRING -> DONE | FAILED (`kvtransfer.state.TransferState`). A transfer that fails,
   times out or is cancelled releases its handles; the caller then frees the blocks it had
   pinned for it.
5. `agent.close()` cancels what is in flight, forgets peers and deregisters the cache.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from .agent_base import BlockTransferAgent

log = logging.getLogger(__name__)

BackendKind = Literal["auto", "nixl", "local"]

_agent_host = "127.0.0.1"


def set_agent_host(host: str) -> None:
    """The address this process's socket agents listen on and publish: the slot's own (`--host`).
    Process-wide because a group's follower ranks open their agents from a broadcast message,
    which cannot carry each rank's address."""
    global _agent_host
    _agent_host = host


def make_agent(kind: BackendKind, name: str, cache: torch.Tensor) -> BlockTransferAgent:
    """The agent for `kind`; `auto` is NIXL where it imports and passes a self-test, else local."""
    from .local_backend import LocalAgent

    if kind == "local":
        return LocalAgent(name, cache, _agent_host)
    from . import nixl_backend

    if kind == "nixl" or nixl_backend.nixl_works():
        log.info("kvtransfer: agent %s uses the nixl backend", name)
        return nixl_backend.NixlAgent(name, cache)
    log.info("kvtransfer: agent %s uses the local (socket) backend: NIXL unavailable", name)
    return LocalAgent(name, cache, _agent_host)
