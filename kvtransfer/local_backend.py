"""The portable block transfer backend: plain TCP sockets, no NIXL. Same API as the NIXL backend
(`kvtransfer.agent_base`), for hosts where NIXL does not import or fails its self-test. Host memory
only: a device cache would need staging through a host buffer.

Each agent listens on a TCP port (its published endpoint). One send is one connection, driven by
a thread the send owns: connect (BOOTSTRAPPING ends once the peer is known and the thread
starts), a `FrameHeader`, the destination ranges, then the source bytes in descriptor order,
streamed straight out of the cache tensor; the receiving agent's connection thread `recv_into`s
them straight into its cache tensor at the destination offsets and answers one status byte once
everything has landed. The sender is DONE on that byte; a broken connection (the peer died), a
rejected frame or the timeout makes it FAILED, and the receiver FAILED when the sender's stream
breaks off. Every thread is kept in the agent's set and joined at `close()`.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from .agent_base import (
    AgentInfo,
    AwaitedReceive,
    BlockTransfer,
    BlockTransferAgent,
    check_descriptors,
)
from .state import TransferState

log = logging.getLogger(__name__)

_MAGIC = b"KVX1"
_OK, _REJECTED = b"\x01", b"\x00"
IDLE_TIMEOUT_S = 30.0  # a sender silent this long mid-transfer is taken for dead


@dataclass(frozen=True)
class FrameHeader:
    """Opens every transfer on the wire; followed by num_descs (dst_offset, length) int64 pairs."""

    transfer_id: str
    num_descs: int
    total_bytes: int

    _FMT = struct.Struct("!4sHQQ")

    def pack(self) -> bytes:
        tid = self.transfer_id.encode()
        return self._FMT.pack(_MAGIC, len(tid), self.num_descs, self.total_bytes) + tid

    @classmethod
    def read(cls, sock: socket.socket) -> FrameHeader:
        magic, id_len, n, total = cls._FMT.unpack(_recv_exact(sock, cls._FMT.size))
        if magic != _MAGIC:
            raise ValueError("not a kvtransfer frame")
        return cls(_recv_exact(sock, id_len).decode(), n, total)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        got = sock.recv_into(view)
        if got == 0:
            raise ConnectionError("the sender closed the connection mid-transfer")
        view = view[got:]


class LocalAgent(BlockTransferAgent):
    backend_name = "local"

    def __init__(self, name: str, cache: torch.Tensor, host: str = "127.0.0.1") -> None:
        if cache.device.type != "cpu":
            raise ValueError("the local backend moves host memory only")
        super().__init__(name, cache)
        self.buf = memoryview(cast(bytearray, cache.reshape(-1).view(torch.uint8).numpy()))
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.2)  # how often the accept loop checks for close()
        self._endpoint = f"{host}:{self._listener.getsockname()[1]}".encode()
        self._lock = threading.Lock()
        self._arrived: dict[str, bool] = {}
        self._threads: set[threading.Thread] = set()
        self._closing = threading.Event()
        self._sends: set[LocalSend] = set()
        self._receiving = 0  # connections whose transfer has not landed or failed yet
        self._spawn(self._accept_loop, f"kvx-accept-{name}")

    @property
    def info(self) -> AgentInfo:
        return AgentInfo(self.name, self.backend_name, self.cache.data_ptr(), self.nbytes, self._endpoint)

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        def run() -> None:
            try:
                target(*args)
            except Exception:
                log.exception("kvtransfer thread %s died", name)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._spawn(self._serve, f"kvx-recv-{self.name}", conn)

    def _serve(self, conn: socket.socket) -> None:
        """Land one transfer in the cache; a broken stream marks it failed."""
        header: FrameHeader | None = None
        with self._lock:
            self._receiving += 1
        with conn:
            try:
                conn.settimeout(IDLE_TIMEOUT_S)
                header = FrameHeader.read(conn)
                pairs = np.frombuffer(_recv_exact(conn, 16 * header.num_descs), dtype="<i8").reshape(-1, 2)
                if pairs.size and (pairs.min() < 0 or (pairs[:, 0] + pairs[:, 1]).max() > self.nbytes):
                    conn.sendall(_REJECTED)
                    raise ValueError(f"{header.transfer_id}: ranges outside this cache")
                for dst, length in pairs.tolist():
                    _recv_into(conn, self.buf[dst:dst + length])
                self._land(header.transfer_id, True)
                conn.sendall(_OK)
            except (OSError, ValueError) as e:
                self._land(header.transfer_id if header else None, False)
                log.warning("kvtransfer receive failed: %s", e)

    def _land(self, transfer_id: str | None, ok: bool) -> None:
        with self._lock:
            self._receiving -= 1
            if transfer_id is not None:
                self._arrived[transfer_id] = ok

    def arrived(self, transfer_id: str) -> bool | None:
        with self._lock:
            return self._arrived.pop(transfer_id, None)

    def progress(self) -> None:
        """Nothing to do: the connection threads make progress."""

    def _connect(self, peer: AgentInfo) -> None:
        """Nothing to set up: each send opens its own connection."""

    def remove_peer(self, name: str) -> None:
        self.peers.pop(name, None)

    def send(self, peer: str, descs: np.ndarray, transfer_id: str, timeout_s: float) -> LocalSend:
        t = LocalSend(self, peer, descs, transfer_id, timeout_s)
        self._sends.add(t)
        return t

    def receive(self, transfer_id: str, timeout_s: float) -> AwaitedReceive:
        return AwaitedReceive(self, transfer_id, timeout_s, "the sender's stream broke off")

    @property
    def open_transfers(self) -> int:
        with self._lock:
            return len(self._sends) + self._receiving

    def close(self) -> None:
        for t in list(self._sends):
            t.cancel()
        self._closing.set()
        self._listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=2.0)
        self.peers.clear()


class LocalSend(BlockTransfer):
    def __init__(self, agent: LocalAgent, peer: str, descs: np.ndarray, transfer_id: str,
                 timeout_s: float) -> None:
        self.agent, self.peer, self.transfer_id = agent, peer, transfer_id
        self.descs = check_descriptors(descs, agent.nbytes, 1 << 62)
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.state = TransferState.BOOTSTRAPPING
        self._sock: socket.socket | None = None
        self._outcome: str | None = None  # set by the thread: "" = landed, else why not
        self._stop = threading.Event()

    def poll(self) -> TransferState:
        if self.state.finished:
            return self.state
        if self._outcome is not None:
            self._end(self._outcome)
        elif time.monotonic() > self.deadline:
            self._end(f"timed out after {self.timeout_s:g}s")
        elif self.state is TransferState.BOOTSTRAPPING and self.peer in self.agent.peers:
            self.state = TransferState.TRANSFERRING
            self.agent._spawn(self._run, f"kvx-send-{self.transfer_id}", self.agent.peers[self.peer])
        return self.state

    def _run(self, peer: AgentInfo) -> None:
        try:
            self._stream(peer)
            self._outcome = ""
        except (OSError, ValueError) as e:
            self._outcome = "cancelled" if self._stop.is_set() else f"{type(e).__name__}: {e}"

    def _stream(self, peer: AgentInfo) -> None:
        host, port = peer.endpoint.decode().rsplit(":", 1)
        if len(self.descs) and (self.descs[:, 1] + self.descs[:, 2]).max() > peer.nbytes:
            raise ValueError(f"descriptors exceed {peer.name}'s cache ({peer.nbytes} bytes)")
        with socket.create_connection((host, int(port)), timeout=self._remaining()) as sock:
            header = FrameHeader(self.transfer_id, len(self.descs), int(self.descs[:, 2].sum()))
            pairs = np.ascontiguousarray(self.descs[:, 1:], dtype="<i8")
            # the header goes out even when cancelled meanwhile: then the receiver learns which
            # transfer broke off and fails it at once instead of at its timeout
            sock.sendall(header.pack() + pairs.tobytes())
            self._sock = sock
            for src, length in self.descs[:, [0, 2]].tolist():
                if self._stop.is_set():
                    raise OSError("cancelled")
                sock.settimeout(self._remaining())
                sock.sendall(self.agent.buf[src:src + length])
            sock.settimeout(self._remaining())
            if _recv_exact(sock, 1) != _OK:
                raise ValueError("the receiver rejected the transfer")

    def _remaining(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def _end(self, outcome: str) -> None:
        if outcome:
            self.error = outcome
            self.state = TransferState.FAILED
            self._stop.set()
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)  # unblocks the thread, which then exits
                except OSError:
                    pass
            log.warning("kvtransfer %s -> %s failed: %s", self.transfer_id, self.peer, outcome)
        else:
            self.state = TransferState.DONE
        self.agent._sends.discard(self)

    def cancel(self) -> None:
        if not self.state.finished:
            self._end("cancelled")
