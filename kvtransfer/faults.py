"""A test hook: kill this process at a named point of a KV transfer.

A receiving process that dies mid-transfer cannot be provoked from outside at the right moment,
so end-to-end tests (tests/e2e/test_handoff.py) start one slot with `NITSUM_TEST_FAULT=<point>`
(`LaunchConfig.slot_env`). Points: `kv-receive` (a decode leader, once the first chunk of a KV
hand-off has arrived and before it is admitted; on the block path, any decode rank once its
receives are posted, the prefill ranks writing or about to write). Unset in production: then `maybe_die` does
nothing.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "NITSUM_TEST_FAULT"


def maybe_die(point: str) -> None:
    """SIGKILL this process if the test hook names `point`."""
    if os.environ.get(ENV) == point:
        log.error("test hook %s=%s: killing this process (pid %d)", ENV, point, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)
