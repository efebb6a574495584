"""The process environment vLLM's CPU backend wants, as its CPU installation docs advise.

Standard library only (used by `bench/engine.py` and by `vllm_peer.py` under `.venv-vllm`).

- `LD_PRELOAD`: tcmalloc (Debian `libtcmalloc-minimal4`) and Intel OpenMP (`libiomp5.so` from the
  `intel-openmp` wheel in the vLLM venv). Both must be preloaded: they replace the allocator and
  the OpenMP runtime that torch would otherwise load first.
- `VLLM_CPU_OMP_THREADS_BIND`: the cores its OpenMP threads are pinned to (all of them: 0-N).
- `VLLM_CPU_KVCACHE_SPACE`: GiB reserved for its KV cache.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

TCMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)
PRELOADED_FLAG = "NITSUM_VLLM_PRELOADED"


def find_tcmalloc() -> str | None:
    """Path of tcmalloc-minimal, or None when the Debian package is not installed."""
    return next((p for p in TCMALLOC_CANDIDATES if os.path.exists(p)), None)


def find_iomp(venv_python: Path) -> str | None:
    """Path of `libiomp5.so` installed by `intel-openmp` in the venv of `venv_python`."""
    venv = Path(venv_python).parent.parent
    hits = sorted(glob.glob(str(venv / "lib" / "libiomp5.so"))) or sorted(
        glob.glob(str(venv / "lib" / "**" / "libiomp5.so"), recursive=True)
    )
    return hits[0] if hits else None


def vllm_env(venv_python: Path, cores: str | None = None, kv_cache_gib: int = 2) -> dict[str, str]:
    """A copy of `os.environ` with what vLLM-CPU needs; notes what it could not find."""
    env = dict(os.environ)
    preload = [p for p in (find_tcmalloc(), find_iomp(venv_python)) if p]
    if env.get("LD_PRELOAD"):
        preload.append(env["LD_PRELOAD"])
    env["LD_PRELOAD"] = ":".join(preload)
    env["VLLM_CPU_OMP_THREADS_BIND"] = cores or f"0-{(os.cpu_count() or 1) - 1}"
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    env[PRELOADED_FLAG] = "1"
    return env


def missing_preloads(env: dict[str, str]) -> list[str]:
    """Which of the two recommended libraries `env` does not preload."""
    preload = env.get("LD_PRELOAD", "")
    return [name for name in ("libtcmalloc", "libiomp5") if name not in preload]
