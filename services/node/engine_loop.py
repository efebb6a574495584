"""The engine on its own thread: blocking steps there, the asyncio side stays responsive.

Every engine call goes through `call()` (run on the engine thread, between steps, so new
requests join the running batch at the next step: continuous batching). Step outputs are handed
to `on_outputs` on the event loop, in step order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from services.engine import LLMEngine, RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineStats:
    running: int = 0  # requests the engine holds (waiting, running, or prefilled and held)
    used_blocks: int = 0
    total_blocks: int = 0
    steps: int = 0
    last_step_s: float = 0.0
    queued_tokens: int = 0  # prompt tokens not computed yet
    # The group's step-time model (services/engine/policy.py StepTimeModel): seconds = base +
    # per_token x prompt tokens + per_decode x decoding sequences + per_context x KV tokens read.
    step_model: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks


class EngineLoop:
    def __init__(self, engine: LLMEngine, on_outputs: Callable[[list[RequestOutput]], None],
                 on_step: Callable[[float], None] | None = None) -> None:
        self.engine = engine
        self._on_outputs = on_outputs
        self._on_step = on_step  # called on the engine thread with each step's seconds (metrics)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.stats = EngineStats()
        self.failure: BaseException | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._refresh_stats(0, 0.0)
        self._thread.start()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args)` on the engine thread between steps; its exception is raised here."""
        if self.failure is not None:
            raise RuntimeError(f"engine thread died: {self.failure!r}")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._commands.put((lambda: fn(*args, **kwargs), future))
        return await asyncio.wrap_future(future)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._commands.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        steps = 0
        try:
            while True:
                if not self._drain(block=not self.engine.has_unfinished()):
                    return
                if not self.engine.has_unfinished():
                    continue
                started = time.perf_counter()
                outputs = self.engine.step()
                steps += 1
                seconds = time.perf_counter() - started
                self._refresh_stats(steps, seconds)
                if self._on_step is not None:
                    self._on_step(seconds)
                if outputs:
                    assert self._loop is not None
                    self._loop.call_soon_threadsafe(self._on_outputs, outputs)
        except BaseException as e:  # the node cannot serve without its engine: say so loudly
            log.exception("engine thread failed")
            self.failure = e

    def _drain(self, block: bool) -> bool:
        """Run queued commands; False once asked to stop."""
        try:
            item = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)
            self._refresh_stats(self.stats.steps, self.stats.last_step_s)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _refresh_stats(self, steps: int, last_step_s: float) -> None:
        used, total = self.engine.kv_usage()
        scheduler = self.engine.scheduler
        model = scheduler.step_time.coefficients or (0.0, 0.0, 0.0, 0.0)
        self.stats = EngineStats(self.engine.num_requests(), used, total, steps, last_step_s,
                                 scheduler.queued_prompt_tokens(), model)
