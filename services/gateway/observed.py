"""What the gateway saw of each request, for the autopilot (router/live/autopilot.py).

Two kinds of observation, appended to the capped Redis stream `observed` in batches (one pipeline
every `flush_s`, off the request path):

  {"k": "a", "at": arrival, "tier": ..., "prompt": tokens}                 a request reached its tier queue's door
  {"k": "f", "at": end, "tier": ..., "outcome": ok|shed|error|..., "prompt": tokens, "output": tokens,
   "ttft": s, "tpot": s, "met": bool}                                       it ended

Arrivals include requests shed with 429 (the offered load, not only the admitted one), so the
planner sees the load a better plan could take. Losing a batch of observations (Redis away) costs
the estimate a little accuracy and nothing else: they are dropped, not retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from services.cluster import ClusterClient, journal
from services.cluster.client import REDIS_ERRORS
from services.tasks import TaskSet

log = logging.getLogger("nitsum.gateway")

MAX_BUFFERED = 20_000  # past this (Redis away for long), the oldest observations go first


class ObservationLog:
    def __init__(self, cluster: ClusterClient, tasks: TaskSet, flush_s: float = 0.5) -> None:
        self.cluster = cluster
        self.flush_s = flush_s
        self._buffer: list[dict[str, Any]] = []
        tasks.spawn(self._run(), name="observations")

    def arrival(self, tier: str, prompt_tokens: int, at: float | None = None) -> None:
        self._add({"k": "a", "at": round(time.time() if at is None else at, 4), "tier": tier, "prompt": prompt_tokens})

    def finish(self, tier: str, outcome: str, prompt_tokens: int, output_tokens: int = 0,
               ttft_s: float | None = None, tpot_s: float | None = None, met: bool = False) -> None:
        self._add({"k": "f", "at": round(time.time(), 4), "tier": tier, "outcome": outcome, "prompt": prompt_tokens,
                   "output": output_tokens, "ttft": None if ttft_s is None else round(ttft_s, 5),
                   "tpot": None if tpot_s is None else round(tpot_s, 5), "met": bool(met)})

    def _add(self, doc: dict[str, Any]) -> None:
        self._buffer.append(doc)
        if len(self._buffer) > MAX_BUFFERED:
            del self._buffer[: len(self._buffer) - MAX_BUFFERED]

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            if not self._buffer:
                continue
            batch, self._buffer = self._buffer, []
            try:
                await journal.add_observations(self.cluster, batch)
            except REDIS_ERRORS as e:
                log.debug("dropped %d observations (%s)", len(batch), e)
