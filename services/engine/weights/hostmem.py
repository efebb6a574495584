"""Keeping freed host memory in the process, so that re-cutting weights does not fault pages in.

A reconfiguration builds a slot's new weights (and, on CPU, their oneDNN-packed copies) next to
the old ones, then frees the old. glibc hands large freed blocks back to the kernel (`munmap`,
heap trimming), so the next epoch's allocations fault every page in again, each zeroed by the
kernel; on a VM with free-page reporting (Firecracker, this project's development machines) the
host must back them again too. There, a fresh 115 MB took 450 ms to write against 40 ms for memory
the process already held, and page faults were three quarters of a TP 2 -> 1 switch.

`keep_freed_memory` makes glibc keep what it frees (one arena, no `mmap` for large blocks, no
trimming) and faults a reserve in once at start, so switches reuse warm memory: the host
counterpart of PyTorch's CUDA caching allocator, which keeps freed device memory the same way.
Where the C library is not glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time

import torch

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def keep_freed_memory(reserve_bytes: int) -> bool:
    """Call before the process starts threads, with `reserve_bytes` > 0. Returns False where it is
    not supported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # One arena: blocks freed by one thread serve the next epoch's allocations on any thread.
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)))
    if not ok:
        log.warning("mallopt refused; freed host memory goes back to the kernel")
        return False
    started = time.perf_counter()
    block = torch.empty(reserve_bytes, dtype=torch.uint8)
    block.fill_(0)  # fault the pages in now; freed, they stay in the heap for the weights
    del block
    log.info("host memory: kept %.0f MiB warm for weights in %.2fs", reserve_bytes / 2**20,
             time.perf_counter() - started)
    return True
