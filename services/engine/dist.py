"""A tensor-parallel process group built for one group of ranks from a key-prefixed store.

The group is constructed directly (`ProcessGroupGloo` / `ProcessGroupNCCL` over a `PrefixStore`)
instead of through `init_process_group`, so a process can leave one group and join another at a
new plan epoch without the rest of the cluster joining in, and several groups can share one
TCPStore under different prefixes.
"""

from __future__ import annotations

import os
import pickle
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"dist address {addr!r}: expected HOST:PORT")
    return host, int(port)


def make_store(addr: str, is_master: bool, timeout_s: float) -> dist.TCPStore:
    host, port = parse_addr(addr)
    return dist.TCPStore(host, port, None, is_master, timedelta(seconds=timeout_s), wait_for_workers=False)


def gloo_group(store: dist.Store, rank: int, size: int, timeout: timedelta, host: str | None) -> Any:
    """A gloo process group whose transport binds `host`, the address peers reach this process at
    (a slot's --host). Left to itself gloo binds what the machine's hostname resolves to (often
    127.0.0.1, which a peer on another host cannot reach); that stays the behaviour without a host
    and wherever GLOO_SOCKET_IFNAME names the interfaces."""
    if not host or host in ("0.0.0.0", "::") or os.environ.get("GLOO_SOCKET_IFNAME"):
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # missing from torch's stubs
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    opts._timeout = timeout
    opts._threads = 2  # what the constructor above gives one device
    return dist.ProcessGroupGloo(store, rank, size, opts)


class TPGroup:
    """The collectives the engine needs, over one process group of `size` ranks."""

    def __init__(self, store: dist.Store, prefix: str, rank: int, size: int, device: torch.device,
                 timeout_s: float, host: str | None = None) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.store = dist.PrefixStore(prefix, store)
        timeout = timedelta(seconds=timeout_s)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg: Any = dist.ProcessGroupNCCL(self.store, rank, size, opts)
        else:
            self.pg = gloo_group(self.store, rank, size, timeout, host)

    def all_reduce(self, t: torch.Tensor) -> None:
        self.pg.allreduce([t]).wait()

    def broadcast(self, t: torch.Tensor, src: int = 0) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([t], opts).wait()

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.size)]
        self.pg.allgather([out], [t]).wait()
        return out

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0 sends `obj`; every rank returns it. Two small broadcasts: length, then bytes."""
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.long)
        else:
            size = torch.zeros(1, dtype=torch.long)
        self.broadcast(size.to(self.device))
        if self.rank != 0:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        buf = payload.to(self.device)
        self.broadcast(buf)
        return obj if self.rank == 0 else pickle.loads(buf.cpu().numpy().tobytes())
