"""The host memory keeper (services/engine/hostmem.py): freed weights stay in the process.

mallopt settings are process-wide, so each case runs in a fresh interpreter; page faults are
counted (getrusage), not timed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, threading
    import torch
    from services.engine.hostmem import keep_freed_memory
    if int(sys.argv[1]):
        assert keep_freed_memory(96 << 20)
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = []
    def epoch():  # build a 'model' of 8 MiB tensors on another thread, as a reshard does, then free it
        before = faults()
        weights = [torch.empty(8 << 20, dtype=torch.uint8).fill_(1) for _ in range(8)]
        out.append(faults() - before)
        del weights
    for _ in range(2):
        t = threading.Thread(target=epoch); t.start(); t.join()
    print(out[0], out[1])
""")


def page_faults(keep: bool) -> tuple[int, int]:
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(int(keep))], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    first, second = r.stdout.split()
    return int(first), int(second)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_reused_without_page_faults() -> None:
    pages = (64 << 20) // 4096
    plain = page_faults(keep=False)
    assert min(plain) > pages // 2  # glibc hands 8 MiB blocks back to the kernel: every epoch faults them in
    kept = page_faults(keep=True)
    assert max(kept) < pages // 20  # the reserve was faulted in once, at start
