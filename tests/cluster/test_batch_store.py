"""services/cluster/batch_store.py on a real redis-server: a batch's runner writes only while it holds
the lease, a line's answer is kept once, status changes only from the statuses allowed, and a
final status takes the batch off the active set."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from services.cluster import ClusterClient
from services.cluster.batch_store import BatchRecord, BatchStore, FileRecord, InFlight
from services.cluster.redis_server import RedisServer
from services.rpc import pb


def _run(redis_server: RedisServer, body: Callable[[BatchStore], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        cluster = ClusterClient(redis_server.url, f"bs{uuid.uuid4().hex[:8]}:")
        try:
            return await body(BatchStore(cluster))
        finally:
            await cluster.close()
    return asyncio.run(main())


def _record(batch_id: str = "batch_1", owner: str = "o") -> BatchRecord:
    return BatchRecord(batch_id, owner, "/v1/completions", "file-1", "24h", "batch", "in_progress", 100, 200, total=3)


def test_answers_are_written_once_and_only_by_the_lease_holder(redis_server: RedisServer) -> None:
    async def body(store: BatchStore) -> None:
        await store.create_batch(_record())
        assert await store.hold_lease("batch_1", "gw-a", 5000)
        assert not await store.hold_lease("batch_1", "gw-b", 5000)  # held: another gateway waits
        request = pb.QueuedRequest(request_id="cmpl-1", tier="batch", prompt_ids=[1, 2])
        await store.set_in_flight("batch_1", 0, InFlight("1-0", request))
        assert (await store.in_flight("batch_1"))[0] == InFlight("1-0", request)
        assert await store.record_line("batch_1", "gw-b", 0, True, "late") == -1  # not the holder: nothing
        assert await store.record_line("batch_1", "gw-a", 0, True, "first", 5, 7) == 1
        assert await store.record_line("batch_1", "gw-a", 0, False, "again", 5, 7) == 0  # once per line
        assert await store.record_line("batch_1", "gw-a", 2, False, "bad") == 1
        assert await store.in_flight("batch_1") == {}
        view = await store.view("batch_1")
        assert view is not None and (view.completed, view.failed) == (1, 1)
        assert (view.record.input_tokens, view.record.output_tokens) == (5, 7)
        assert await store.results("batch_1", "out") == ["first"] and await store.done_lines("batch_1") == {0, 2}
        await store.release_lease("batch_1", "gw-a")
        assert await store.hold_lease("batch_1", "gw-b", 5000)

    _run(redis_server, body)


def test_status_changes_only_from_allowed_statuses_and_final_ones_leave_the_active_set(redis_server: RedisServer) -> None:
    async def body(store: BatchStore) -> None:
        await store.create_batch(_record())
        assert await store.active_batches() == ["batch_1"]
        assert await store.transition("batch_1", ("validating",), {"status": "in_progress"}) == (False, "in_progress")
        assert await store.transition("batch_1", ("in_progress",), {"status": "finalizing"}, "gw-a") == \
            (False, "lease lost")
        assert await store.transition("batch_1", ("in_progress",), {"status": "cancelling", "cancelling_at": 150}) == \
            (True, "in_progress")
        assert await store.active_batches() == ["batch_1"]
        assert await store.transition("batch_1", ("cancelling",), {"status": "cancelled"}) == (True, "cancelling")
        record = await store.batch("batch_1")
        assert record is not None and record.cancelling_at == 150 and record.status == "cancelled"
        assert await store.active_batches() == []
        assert await store.transition("batch_nope", ("validating",), {"status": "failed"}) == (False, "gone")

    _run(redis_server, body)


def test_files_and_pages_of_batches(redis_server: RedisServer) -> None:
    async def body(store: BatchStore) -> None:
        f = FileRecord("file-1", "o", "in.jsonl", "batch", 3, 100, 1)
        await store.put_file(f, b"{}\n")
        assert await store.file("file-1") == f and await store.file_content("file-1") == b"{}\n"
        assert await store.delete_file("file-1") and await store.file("file-1") is None
        for i in range(5):
            await store.create_batch(_record(f"batch_{i}"))
        await store.create_batch(_record("batch_x", owner="someone else"))
        page = await store.list_batches("o", None, 2)
        assert page is not None and [v.record.batch_id for v in page[0]] == ["batch_4", "batch_3"] and page[1]
        page = await store.list_batches("o", "batch_3", 10)
        assert page is not None and [v.record.batch_id for v in page[0]] == ["batch_2", "batch_1", "batch_0"]
        assert not page[1]
        assert await store.list_batches("o", "batch_x", 10) is None  # not theirs

    _run(redis_server, body)
