"""The NIXL/UCX block transfer backend: one `nixl_agent` per rank process, the whole cache tensor
registered once, and each transfer a short series of WRITE requests over descriptor lists.

Why WRITE (push, initiated by the side that holds the data) rather than READ (pull): the source
knows when its blocks are final (prefill finished, or a migration pre-copy round), so it can post
at once without a round trip; NIXL delivers the notification attached to the request only after
the data has landed, which is exactly the receiver's "done" signal, so the receiver stays passive
(it only polls notifications). On this CPU host UCX emulates both over active messages (tcp/lo
with CMA zero-copy) and they measured the same within noise.

Pitfall: with that emulation `transfer()` (postXferReq) moves the whole request before it returns
(1 GiB: ~1.2 s blocked), so a send is cut into requests of about `chunk_bytes` and posts one per
`poll()`: a poll blocks for at most one chunk, and a dead peer is noticed between chunks.

No progress thread by default: the wrapper's thread spins (its delay is fixed at 0), one per
rank process, and on this 2-core host it cost ~2.7x in bandwidth (0.9-1.1 vs 2.5-3.9 GB/s for
512 MiB) besides taking a core from the model. Progress then happens inside our calls: every
`poll()`, and `agent.progress()`, which the step loop should call so notifications and UCX
wire-up are served while no receive is pending (a late-polling receiver slowed only the first
transfer to a peer: 0.6 GB/s at 200 ms between polls, then 2.5 GB/s). Likewise a notification
(a cancelled send's "failed") only leaves when the sending agent is progressed afterwards.

Lifecycle of one send: BOOTSTRAPPING until the peer's metadata is loaded (`add_peer`), then
`initialize_xfer` + `transfer` post each chunk (TRANSFERRING); `check_xfer_state` turns DONE or
ERR; past the timeout, on ERR or on `cancel()` the request handle is released (which asks UCX to
abort it) and the receiver gets a failure notification where it is still reachable. A request UCX
cannot abort yet is kept and released again by `progress()` and at `close()`. On ERR the peer is
dropped (`remove_remote_agent`): its endpoint is broken, and it must publish metadata again.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import torch

from .agent_base import (
    AgentInfo,
    AwaitedReceive,
    BlockTransfer,
    BlockTransferAgent,
    check_descriptors,
    chunk_descriptors,
)
from .state import TransferState

try:
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError:  # the portable backend covers hosts without NIXL
    nixl_agent = nixl_agent_config = None

log = logging.getLogger(__name__)
if nixl_agent is not None and "NIXL_LOG_LEVEL" not in os.environ:
    # nixl logs each agent and backend creation at INFO on *stdout*; keep stdout for our output
    logging.getLogger("nixl").setLevel(logging.WARNING)

_DONE_TAG = b"kvx:done:"
_FAIL_TAG = b"kvx:fail:"
_self_test_result: bool | None = None


class NixlAgent(BlockTransferAgent):
    backend_name = "nixl"

    def __init__(self, name: str, cache: torch.Tensor, chunk_bytes: int = 16 << 20,
                 progress_thread: bool = False) -> None:
        if nixl_agent is None:
            raise RuntimeError("the nixl package is not importable on this host; use the local backend")
        super().__init__(name, cache)
        self.chunk_bytes = chunk_bytes
        config = nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"])
        self.nixl = nixl_agent(name, config)
        self._mem_type = "DRAM" if cache.device.type == "cpu" else "VRAM"
        self._dev_id = 0 if cache.device.index is None else cache.device.index
        self._reg: Any = self.nixl.register_memory(cache)  # one region: the whole cache tensor
        self._handles: set[Any] = set()  # posted requests not yet released
        self._sends: set[NixlSend] = set()
        self._arrived: dict[str, bool] = {}  # transfer id -> landed (True) or failed (False)

    @property
    def info(self) -> AgentInfo:
        return AgentInfo(self.name, self.backend_name, self.cache.data_ptr(), self.nbytes,
                         self.nixl.get_agent_metadata())

    def _connect(self, peer: AgentInfo) -> None:
        loaded = self.nixl.add_remote_agent(peer.endpoint)
        loaded = loaded.decode() if isinstance(loaded, bytes) else loaded
        if loaded != peer.name:
            raise ValueError(f"metadata names agent {loaded!r}, expected {peer.name!r}")

    def remove_peer(self, name: str) -> None:
        if self.peers.pop(name, None) is not None:
            try:
                self.nixl.remove_remote_agent(name)
            except Exception as e:  # already invalid: nothing left to release
                log.debug("remove_remote_agent(%s): %s", name, e)

    def send(self, peer: str, descs: np.ndarray, transfer_id: str, timeout_s: float) -> NixlSend:
        t = NixlSend(self, peer, descs, transfer_id, timeout_s)
        self._sends.add(t)
        return t

    def receive(self, transfer_id: str, timeout_s: float) -> AwaitedReceive:
        return AwaitedReceive(self, transfer_id, timeout_s, 'the sender reported a failure')

    @property
    def open_transfers(self) -> int:
        self._reap()
        return len(self._handles)

    def post_write(self, peer: AgentInfo, descs: np.ndarray, notif: bytes) -> tuple[Any, str]:
        """Create and post one WRITE request; returns (handle, "DONE" | "PROC" | "ERR")."""
        local = np.empty((len(descs), 3), dtype=np.uint64)
        remote = np.empty_like(local)
        local[:, 0] = self.cache.data_ptr() + descs[:, 0]
        remote[:, 0] = peer.base_addr + descs[:, 1]
        local[:, 1] = remote[:, 1] = descs[:, 2]
        local[:, 2] = remote[:, 2] = self._dev_id
        handle = self.nixl.initialize_xfer(
            "WRITE", self.nixl.get_xfer_descs(local, self._mem_type),
            self.nixl.get_xfer_descs(remote, self._mem_type), peer.name, notif)
        self._handles.add(handle)
        return handle, self.nixl.transfer(handle)

    def xfer_state(self, handle: Any) -> str:
        """check_xfer_state, where a disconnected peer (raised, not returned) reads as "ERR"."""
        try:
            return str(self.nixl.check_xfer_state(handle))
        except Exception as e:
            log.debug("nixl: check_xfer_state: %s", e)
            return "ERR"

    def release(self, handle: Any) -> None:
        """Release a request handle; one UCX cannot abort yet stays listed and is retried."""
        try:
            handle.release()
            self._handles.discard(handle)
        except Exception as e:
            log.warning("nixl: request not released yet (%s); will retry", e)

    def _reap(self) -> None:
        owned = {id(s.handle) for s in self._sends}
        for handle in list(self._handles):
            if id(handle) not in owned:  # its send finished but UCX had not let it go
                self.release(handle)

    def notify(self, peer: str, message: bytes) -> None:
        try:
            self.nixl.send_notif(peer, message)
        except Exception as e:  # the peer is gone; its receiver times out instead
            log.debug("nixl: notification to %s failed: %s", peer, e)

    def progress(self) -> None:
        """Progress UCX and file the notifications that arrived (without a progress thread the
        application's calls are what move UCX forward); retries releasing stuck requests."""
        self._reap()
        for messages in self.nixl.get_new_notifs().values():
            for msg in messages:
                if msg.startswith(_DONE_TAG):
                    self._arrived[msg[len(_DONE_TAG):].decode()] = True
                elif msg.startswith(_FAIL_TAG):
                    self._arrived[msg[len(_FAIL_TAG):].decode()] = False

    def arrived(self, transfer_id: str) -> bool | None:
        """True once `transfer_id` landed here, False if its sender failed, None if not yet."""
        self.progress()
        return self._arrived.pop(transfer_id, None)

    def close(self) -> None:
        for t in list(self._sends):
            t.cancel()
        for name in list(self.peers):
            self.remove_peer(name)
        self._reap()
        if self._handles:
            log.warning("nixl: %d requests could not be released before close", len(self._handles))
        if self._reg is not None:
            try:
                self.nixl.deregister_memory(self._reg)
            finally:
                self._reg = None


class NixlSend(BlockTransfer):
    """Posts its descriptors as a series of WRITE requests of about `chunk_bytes` each, one per
    poll: where UCX progresses a post inline (host memory here) that bounds how long a poll
    blocks. The last request carries the done-notification and is posted only once all earlier
    ones completed, so the receiver is told only when every byte has landed."""

    def __init__(self, agent: NixlAgent, peer: str, descs: np.ndarray, transfer_id: str,
                 timeout_s: float) -> None:
        self.agent, self.peer, self.transfer_id = agent, peer, transfer_id
        self.descs = check_descriptors(descs, agent.nbytes, 1 << 62)
        self.chunks = chunk_descriptors(self.descs, agent.chunk_bytes)
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.handle: Any = None  # the request in flight
        self.state = TransferState.BOOTSTRAPPING

    def poll(self) -> TransferState:
        if self.state.finished:
            return self.state
        if time.monotonic() > self.deadline:
            self._fail(f"timed out after {self.timeout_s:g}s")
        elif self.handle is not None:
            self._advance(self.agent.xfer_state(self.handle))
        elif self.state is TransferState.TRANSFERRING:
            self._post_next()
        elif self.peer in self.agent.peers:
            peer = self.agent.peers[self.peer]
            if len(self.descs) and (self.descs[:, 1] + self.descs[:, 2]).max() > peer.nbytes:
                self._fail(f"descriptors exceed {peer.name}'s cache ({peer.nbytes} bytes)")
            else:
                self.state = TransferState.TRANSFERRING
                self._post_next()
        return self.state

    def _post_next(self) -> None:
        notif = _DONE_TAG + self.transfer_id.encode()
        if not self.chunks:
            self.agent.notify(self.peer, notif)
            self._finish()
            return
        chunk = self.chunks.pop(0)
        try:
            self.handle, status = self.agent.post_write(
                self.agent.peers[self.peer], chunk, b"" if self.chunks else notif)
        except Exception as e:
            self._fail(f"posting the transfer failed: {e}", peer_broken=True)
            return
        self._advance(status)

    def _advance(self, status: str) -> None:
        if status == "DONE":
            self.agent.release(self.handle)
            self.handle = None
            if not self.chunks:
                self._finish()
        elif status == "ERR":
            self._fail("UCX reported an error (the peer may be gone)", peer_broken=True)

    def _finish(self) -> None:
        self.state = TransferState.DONE
        self.agent._sends.discard(self)

    def _fail(self, reason: str, peer_broken: bool = False) -> None:
        self.error = reason
        self.state = TransferState.FAILED
        if self.handle is not None:
            self.agent.release(self.handle)
        self.agent._sends.discard(self)
        if peer_broken:
            self.agent.remove_peer(self.peer)
        elif self.peer in self.agent.peers:
            self.agent.notify(self.peer, _FAIL_TAG + self.transfer_id.encode())
        log.warning("kvtransfer %s -> %s failed: %s", self.transfer_id, self.peer, reason)

    def cancel(self) -> None:
        if not self.state.finished:
            self._fail("cancelled")


def nixl_works(timeout_s: float = 10.0) -> bool:
    """Whether NIXL imports and moves bytes between two agents here (checked once per process)."""
    global _self_test_result
    if _self_test_result is None:
        _self_test_result = nixl_agent is not None and _self_test(timeout_s)
    return _self_test_result


def _self_test(timeout_s: float) -> bool:
    src = torch.arange(1 << 16, dtype=torch.int32).view(torch.uint8)
    dst = torch.zeros_like(src)
    tag = f"kvx-selftest-{os.getpid()}"
    agents: list[NixlAgent] = []
    try:
        a = NixlAgent(f"{tag}-a", src, progress_thread=True)
        b = NixlAgent(f"{tag}-b", dst, progress_thread=True)
        agents += [a, b]
        a.add_peer(b.metadata())
        descs = np.array([[0, 4096, 8192], [16384, 0, 4096]], dtype=np.int64)
        send, recv = a.send(b.name, descs, "selftest", timeout_s), b.receive("selftest", timeout_s)
        while not (send.poll().finished and recv.poll().finished):  # both agents must progress
            time.sleep(0.0005)
        ok = send.state is recv.state is TransferState.DONE
        return ok and torch.equal(dst[4096:12288], src[:8192]) and torch.equal(dst[:4096], src[16384:20480])
    except Exception as e:
        log.warning("nixl self-test failed: %s", e)
        return False
    finally:
        for agent in agents:
            agent.close()
