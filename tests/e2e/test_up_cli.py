"""`nitsum up` refuses bad input with one line and exit status 2, before starting anything."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args, words", [
    (["--plan", "x1"], "unknown role"),
    (["--plan", "p3,d1"], "power of two"),
    (["--plan", "d1,d1"], "no prefill group"),
    (["--port", "70000"], "port"),
    (["--model", "/nonexistent/model", "--port", "0"], "config.json"),
])
def test_bad_arguments_exit_2_with_one_line(args: list[str], words: str) -> None:
    r = subprocess.run([sys.executable, "-m", "services.up_cli", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nitsum up: error:") and words in lines[0]
