"""The one state of a KV transfer, for both paths: a request's gathered KV over gRPC
(`base.py`) and a rank's blocks written into a peer's cache (`agent_base.py`).

PENDING: the byte path's sender started nothing yet, or its receiver saw nothing arrive.
BOOTSTRAPPING: the block path's peer metadata is not loaded yet.
TRANSFERRING -> DONE | FAILED.
"""

from __future__ import annotations

import enum


class TransferState(enum.Enum):
    PENDING = "pending"
    BOOTSTRAPPING = "bootstrapping"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)
