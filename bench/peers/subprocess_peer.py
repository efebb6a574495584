"""Runs one benchmark peer in a child process and reads the JSON line it prints last.

A peer in its own process starts with a clean heap and its own thread settings, so what one
subject leaves behind (threads, allocator state) cannot slow the next. The child runs in its own
process group: on timeout or interrupt the whole group is killed, engine processes it forked
included. Its stderr goes to a log file when one is given (vLLM is verbose), else to ours.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any


def note(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _run_group(
    cmd: list[str], env: dict[str, str], stderr: IO[str] | None, timeout_s: float, cwd: Path | None
) -> tuple[int | None, str]:
    """(exit status, stdout) of `cmd`, or (None, "") when it ran past `timeout_s`."""
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True
    )
    try:
        stdout, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, ""
    finally:
        if proc.poll() is None:  # timed out or interrupted: take its engine processes down too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, stdout


def _echo_log(log_path: Path, prefix: str, tail: bool) -> None:
    """Echo the peer's progress lines (those starting with `prefix`), and its last lines on failure."""
    lines = log_path.read_text(errors="replace").splitlines()
    for line in lines:
        if line.startswith(prefix):
            print(line, file=sys.stderr, flush=True)
    if tail:
        print("\n".join(lines[-25:]), file=sys.stderr, flush=True)


def run_json_peer(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    timeout_s: float,
    log_path: Path | None = None,
    progress_prefix: str = "[",
    cwd: Path | None = None,
) -> dict[str, Any] | None:
    """The peer's last JSON line, or None (with a note on stderr) when it fails or times out."""
    if log_path is None:
        returncode, stdout = _run_group(cmd, env, None, timeout_s, cwd)
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        note(f"{name}: running (log: {log_path})")
        with log_path.open("w") as log:
            returncode, stdout = _run_group(cmd, env, log, timeout_s, cwd)
        _echo_log(log_path, progress_prefix, tail=returncode != 0)
    if returncode is None:
        note(f"{name}: timed out after {timeout_s:.0f}s; skipped")
        return None
    if returncode != 0:
        note(f"{name}: exited with {returncode}; skipped")
        return None
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not lines:
        note(f"{name}: printed no JSON line; skipped")
        return None
    result: dict[str, Any] = json.loads(lines[-1])
    return result
