"""One batch's life on the gateway that holds its lease.

validating: the input file is read (batch_input.py); its bad lines go to the error file at once
-> in_progress: the other lines run (batch_line.py), at most `BatchPolicy.window` in flight, each
answer recorded once in Redis as it comes -> finalizing: the output and error files are written
from the recorded answers -> completed. Cancelled (`cancelling`, set by any gateway): no line starts
any more, the requests in flight are cancelled, the files hold what was answered -> cancelled.
Past `expires_at`: the same, with every line not answered in the error file as `batch_expired`
-> expired. An input file gone before it was read -> failed.

A watcher refreshes the lease and reads the status every `BatchPolicy.watch_s`; a runner that
loses its lease stops at once and writes nothing more (batch_store.py fences every write), and the
gateway that takes the batch over starts again from what Redis holds: answered lines are not run
again, lines that were in flight are read back or run again (batch_line.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from services.cluster.batch_store import BatchRecord, BatchStore, FileRecord, InFlight
from services.tasks import TaskSet

from .batch_input import ENDPOINTS, BadLine, BatchLine, read_input
from .batch_line import MAX_INTERNAL_ERRORS, LineRunner, bad_line_output, output_line

log = logging.getLogger("nitsum.gateway")


@dataclass(frozen=True)
class BatchPolicy:
    window: int = 16  # a batch's lines in flight at once
    lease_ms: int = 5000  # how long a gateway that died holds its batches up
    watch_s: float = 0.5  # how often the lease is refreshed and cancellation looked for
    max_retry_s: float = 5.0  # longest wait before a line turned away (429/503/504) tries again
    max_line_bytes: int = 4 << 20  # GatewayConfig.max_body_bytes: a line is one request


def errors_json(code: str, message: str, param: str | None = None, line: int | None = None) -> str:
    """A batch's `errors.data` (why it failed), as stored."""
    return json.dumps([{"code": code, "message": message, "param": param, "line": line}])


def output_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output ("out") or error ("err") file: the same if finalizing runs twice."""
    return "file-" + hashlib.blake2b(f"{batch_id}:{kind}".encode(), digest_size=12).hexdigest()


class BatchRun:
    def __init__(self, store: BatchStore, lines: LineRunner, policy: BatchPolicy, batch_id: str, token: str) -> None:
        self.store = store
        self.lines = lines
        self.policy = policy
        self.batch_id = batch_id
        self.token = token  # this gateway's lease token
        self.stop = asyncio.Event()
        self.lost = False
        self.expired = False
        self.tasks = TaskSet(f"batch-{batch_id}")

    async def run(self) -> None:
        self.tasks.spawn(self._watch(), name=f"watch-{self.batch_id}")
        try:
            record = await self.store.batch(self.batch_id)
            if record is None:
                return
            content = await self.store.file_content(record.input_file_id)
            if content is None:
                await self._fail(record, "input_file_missing", f"input file {record.input_file_id} is gone")
                return
            items = await asyncio.to_thread(read_input, content, record.endpoint, self.policy.max_line_bytes)
            if record.status == "validating":
                await self._validate(record, items)
                record = await self.store.batch(self.batch_id) or record
            if record.status == "in_progress" and not self.stop.is_set():
                await self._feed(record, [i for i in items if isinstance(i, BatchLine)])
            if not self.lost:
                await self._finish(len(items), [i for i in items if isinstance(i, BatchLine)])
        finally:
            await self.tasks.cancel_all()
            if not self.lost:
                await self.store.release_lease(self.batch_id, self.token)

    async def _validate(self, record: BatchRecord, items: list[BatchLine | BadLine]) -> None:
        for bad in (i for i in items if isinstance(i, BadLine)):
            await self._record(bad.index, False, bad_line_output(self.batch_id, bad))
        await self.store.transition(self.batch_id, ("validating",), {"status": "in_progress", "total": len(items),
                                    "in_progress_at": int(time.time())}, self.token)

    async def _feed(self, record: BatchRecord, lines: list[BatchLine]) -> None:
        done = await self.store.done_lines(self.batch_id)
        flights = await self.store.in_flight(self.batch_id)
        room = asyncio.Semaphore(self.policy.window)
        running: set[asyncio.Task[None]] = set()
        chat = ENDPOINTS[record.endpoint]
        if done or flights:
            log.info("batch %s resumes: %d of %d lines answered, %d were in flight", self.batch_id, len(done),
                     record.total, len(flights))
        for line in (x for x in lines if x.index not in done):
            if not await self._until_stopped(room.acquire()):
                break
            task = self.tasks.spawn(self._line(line, chat, record.tier, flights.get(line.index)),
                                    name=f"line-{self.batch_id}-{line.index}")
            running.add(task)
            task.add_done_callback(lambda t: self._freed(room, running, t))
        if running:
            await self._until_stopped(asyncio.wait(set(running)))
        for task in list(running):  # stopped: cancelled, expired, or the lease lost
            task.cancel()
        if running:
            await asyncio.wait(set(running))

    @staticmethod
    def _freed(room: asyncio.Semaphore, running: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
        room.release()
        running.discard(task)

    async def _line(self, line: BatchLine, chat: bool, tier: str, resume: InFlight | None) -> None:
        async def in_flight(flight: InFlight) -> None:
            await self.store.set_in_flight(self.batch_id, line.index, flight)

        internal_errors = 0
        while True:
            result = await self.lines.run(line, chat, tier, resume, in_flight)
            resume = None
            if result.transient:
                await asyncio.sleep(min(result.retry_after_s or 1.0, self.policy.max_retry_s))
                continue
            if result.status >= 500:
                internal_errors += 1
                if internal_errors < MAX_INTERNAL_ERRORS:
                    continue
            await self._record(line.index, result.status == 200, output_line(self.batch_id, line, result),
                               result.prompt_tokens, result.completion_tokens)
            return

    async def _record(self, index: int, ok: bool, text: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if await self.store.record_line(self.batch_id, self.token, index, ok, text, prompt_tokens,
                                        completion_tokens) < 0:
            self._lose()

    def _lose(self) -> None:
        if not self.lost:
            log.warning("batch %s: this gateway lost its lease; another one runs it now", self.batch_id)
        self.lost = True
        self.stop.set()

    async def _until_stopped(self, work: Awaitable[Any]) -> bool:
        """Await `work` unless the run stops first (then cancel it); True if it finished."""
        job = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({job, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if job.done():
            return True
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        return False

    async def _watch(self) -> None:
        while not self.lost:
            if not await self.store.hold_lease(self.batch_id, self.token, self.policy.lease_ms):
                self._lose()
                return
            record = await self.store.batch(self.batch_id)
            if record is None or record.status == "cancelling":
                self.stop.set()
            elif record.expires_at and time.time() >= record.expires_at and not self.expired:
                log.info("batch %s expired with lines unanswered", self.batch_id)
                self.expired = True
                self.stop.set()
            await asyncio.sleep(self.policy.watch_s)

    async def _finish(self, total: int, lines: list[BatchLine]) -> None:
        record = await self.store.batch(self.batch_id)
        if record is None:
            return
        now = int(time.time())
        if record.status == "cancelling":
            await self._close(record, ("cancelling",), {"status": "cancelled", "cancelled_at": now, "total": total})
            return
        if self.expired and record.status in ("validating", "in_progress"):
            answered = await self.store.done_lines(self.batch_id)
            for line in (x for x in lines if x.index not in answered):
                await self._record(line.index, False, bad_line_output(self.batch_id, BadLine(
                    line.index, line.line, line.custom_id, "batch_expired",
                    "this request was not answered before the batch expired")))
            await self._close(record, ("validating", "in_progress"), {"status": "expired", "expired_at": now})
            return
        if record.status == "in_progress":
            done, _ = await self.store.transition(self.batch_id, ("in_progress",),
                                                  {"status": "finalizing", "finalizing_at": now}, self.token)
            if not done:  # cancelled meanwhile: finish that instead
                await self._finish(total, lines)
                return
            record = await self.store.batch(self.batch_id) or record
        if record.status == "finalizing":
            await self._close(record, ("finalizing",), {"status": "completed", "completed_at": int(time.time())})

    async def _close(self, record: BatchRecord, allowed: tuple[str, ...], changes: dict[str, str | int]) -> None:
        """Write the output and error files from the answers recorded, then the final status."""
        await self.store.drop_in_flight(self.batch_id)
        for kind in ("out", "err"):
            rows = await self.store.results(self.batch_id, kind)
            if not rows:
                continue
            file_id = output_file_id(self.batch_id, kind)
            data = ("\n".join(rows) + "\n").encode()
            await self.store.put_file(FileRecord(file_id, record.owner, f"{self.batch_id}_{'output' if kind == 'out' else 'error'}.jsonl",
                                                 "batch_output", len(data), int(time.time()), len(rows)), data)
            changes["output_file_id" if kind == "out" else "error_file_id"] = file_id
        done, status = await self.store.transition(self.batch_id, allowed, changes, self.token)
        if not done:
            log.info("batch %s: not closed as %s (it is %s)", self.batch_id, changes["status"], status)

    async def _fail(self, record: BatchRecord, code: str, message: str) -> None:
        await self.store.transition(self.batch_id, ("validating", "in_progress", "cancelling"),
                                    {"status": "failed", "failed_at": int(time.time()),
                                     "errors": errors_json(code, message)}, self.token)
