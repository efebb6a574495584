"""The gateway's batch runner: it takes every batch that no live gateway runs and runs it.

Each gateway looks at the active batches every `SCAN_S` (and at once when one is created here);
a batch whose lease is free (new, or its gateway died and its lease ran out) is taken and run by a
`BatchRun`. Several gateways share the work batch by batch; a gateway that restarts picks up
where the dead one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from services.cluster import ClusterClient
from services.cluster.batch_store import BatchStore
from services.cluster.client import REDIS_ERRORS
from services.config import GatewayConfig
from services.metrics import GatewayMetrics
from services.tasks import TaskSet

from .batch_line import LineRunner
from .batch_run import BatchPolicy, BatchRun
from .codec import TextCodec
from .errors import unavailable
from .upstream import Upstream

log = logging.getLogger("nitsum.gateway")
SCAN_S = 1.0


class BatchService:
    def __init__(self, config: GatewayConfig, codec: TextCodec, metrics: GatewayMetrics,
                 policy: BatchPolicy | None = None) -> None:
        self.config = config
        self.codec = codec
        self.metrics = metrics
        self.policy = policy or BatchPolicy(max_line_bytes=config.max_body_bytes)
        self.token = f"gateway-{uuid.uuid4().hex}"  # this gateway's name on the leases it holds
        self.tasks = TaskSet("batches")
        self.store: BatchStore | None = None
        self.lines: LineRunner | None = None
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    @contextlib.asynccontextmanager
    async def serving(self, cluster: ClusterClient | None, upstream: Upstream | None) -> AsyncIterator[None]:
        """Run batches while the gateway serves (its cluster client and upstream started)."""
        assert cluster is not None and upstream is not None, "start the gateway first"
        self.store = BatchStore(cluster)
        self.lines = LineRunner(self.config, self.codec, self.metrics, upstream, cluster)
        self.tasks.spawn(self._scan(), name="batch-scan")
        try:
            yield
        finally:
            await self.tasks.cancel_all()

    def store_of(self) -> BatchStore:
        if self.store is None:
            raise unavailable("the gateway is starting; retry shortly", 1.0)
        return self.store

    def wake(self) -> None:
        """A batch was created here: look for work now rather than at the next scan."""
        self._wake.set()

    async def _scan(self) -> None:
        while True:
            try:
                await self._take_free_batches()
            except REDIS_ERRORS as e:
                log.warning("looking for batches to run failed (%s); trying again", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SCAN_S)
            self._wake.clear()

    async def _take_free_batches(self) -> None:
        assert self.store is not None and self.lines is not None
        for batch_id in await self.store.active_batches():
            if batch_id in self._runs or not await self.store.hold_lease(batch_id, self.token, self.policy.lease_ms):
                continue
            log.info("running batch %s", batch_id)
            run = BatchRun(self.store, self.lines, self.policy, batch_id, self.token)
            task = self.tasks.spawn(run.run(), name=f"batch-{batch_id}")
            self._runs[batch_id] = task
            task.add_done_callback(lambda _, b=batch_id: self._runs.pop(b, None))  # type: ignore[misc]
