"""`nitsum up`'s supervisor, on real child processes: a child that dies is started again after a
backoff, counted, and given up on after too many deaths in a row; stopping stops everything."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from services.supervise import RestartPolicy, Supervisor
from tests.e2e.helpers import wait_for


def _starter(code: str) -> object:
    return lambda: subprocess.Popen([sys.executable, "-c", code])


def test_a_dying_child_is_restarted_counted_and_given_up_on() -> None:
    counted: list[tuple[str, int | None]] = []
    sup = Supervisor(RestartPolicy(backoff_s=0.05, max_backoff_s=0.2, max_restarts=3, window_s=60),
                     on_restart=lambda name, status: counted.append((name, status)))
    sup.add("steady", _starter("import time; time.sleep(60)"))  # type: ignore[arg-type]
    crashy = sup.add("crashy", _starter("raise SystemExit(3)"))  # type: ignore[arg-type]
    sup.watch(period_s=0.02)
    try:
        wait_for(lambda: crashy.given_up, 20, "the crashing child to be given up on")
        assert crashy.restarts == 3 and counted == [("crashy", 3)] * 3
        assert sup.get("steady").alive and sup.get("steady").restarts == 0
        assert [name for name, _ in sup.dead()] == ["crashy"]
    finally:
        steady = sup.get("steady").proc
        sup.stop_all(timeout_s=5)
    assert steady is not None and steady.poll() is not None


def test_a_killed_child_comes_back_with_a_new_pid() -> None:
    sup = Supervisor(RestartPolicy(backoff_s=0.05))
    child = sup.add("worker", _starter("import time; time.sleep(60)"))  # type: ignore[arg-type]
    sup.watch(period_s=0.02)
    try:
        first = child.proc
        assert first is not None
        first.kill()
        wait_for(lambda: child.restarts == 1 and child.alive, 10, "the restart")
        assert child.proc is not None and child.proc.pid != first.pid
    finally:
        sup.stop_all(timeout_s=5)
    time.sleep(0.1)
    assert not child.alive


def test_children_named_last_are_stopped_once_the_others_are_gone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`nitsum up` stops Redis last: the other services write to it on their way out."""
    slow = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.5), sys.exit(0)))\n"
            "time.sleep(60)")
    seen = tmp_path / "seen"
    last = ("import os, signal, sys, time\n"
            "def on_term(*a):\n"
            "    try:\n        os.kill(int(sys.argv[1]), 0); state = 'alive'\n"
            "    except ProcessLookupError:\n        state = 'gone'\n"
            f"    open({str(seen)!r}, 'w').write(state); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, on_term)\n"
            "time.sleep(60)")
    sup = Supervisor()
    service = sup.add("service", _starter(slow))  # type: ignore[arg-type]
    assert service.proc is not None
    time.sleep(0.5)  # its SIGTERM handler is installed
    pid = service.proc.pid
    sup.add("redis", lambda: subprocess.Popen([sys.executable, "-c", last, str(pid)]))
    time.sleep(0.5)
    sup.stop_all(timeout_s=5, last=("redis",))
    assert seen.read_text() == "gone"


def test_a_usage_error_is_not_restarted() -> None:
    """Status 2 is a command's one-line usage or configuration error: restarting cannot fix it."""
    sup = Supervisor(RestartPolicy(backoff_s=0.01))
    child = sup.add("misconfigured", _starter("raise SystemExit(2)"))  # type: ignore[arg-type]
    sup.watch(period_s=0.02)
    try:
        wait_for(lambda: child.given_up, 10, "the child to be given up on")
        assert child.restarts == 0 and child.last_status == 2
    finally:
        sup.stop_all(timeout_s=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_children_do_not_outlive_a_parent_killed_hard(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A `nitsum up` (here: a process that starts a child the way it does) SIGKILLed leaves no child behind."""
    import os
    import signal

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from services.supervise import die_with_parent\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=die_with_parent,"
        " start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
        "time.sleep(60)\n")])
    try:
        wait_for(lambda: pid_file.is_file() and pid_file.read_text() != "", 20, "the child to start")
        child = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()

        def gone() -> bool:
            try:
                with open(f"/proc/{child}/stat") as f:
                    return f.read().split(") ")[1].startswith("Z")  # a zombie waiting for init is gone
            except FileNotFoundError:
                return True
        wait_for(gone, 10, "the orphaned child to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
