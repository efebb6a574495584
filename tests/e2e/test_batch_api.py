"""OpenAI's Batch API on a running mesh (`nitsum up`, plan p1,d1, tiny model), driven by the official
`openai` client: a batch of 200 runs in the batch tier while interactive requests keep being
answered, its answers are those of the same requests sent one by one, a cancel stops it, a gateway
killed mid-batch loses nothing, and bad input gets OpenAI-shaped errors or error-file lines."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from services.gateway.files import MAX_FILE_BYTES
from services.launch import Mesh
from tests.e2e.helpers import wait_for

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def mesh(start_mesh: Callable[..., Mesh], e2e_tiers: dict) -> Iterator[Mesh]:
    with start_mesh("p1,d1", e2e_tiers) as m:
        yield m


def _client(mesh: Mesh, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.url}/v1", api_key="sk-e2e", max_retries=0, timeout=timeout)


def _jsonl(path: Path, lines: list[dict[str, Any] | str]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _chat_line(i: int, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"Tell me about item {i} of {i * 7 % 13}"}],
            "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True, **extra}
    return {"custom_id": f"req-{i}", "method": "POST", "url": CHAT, "body": body}


def _wait_batch(client: openai.OpenAI, batch_id: str, done: Callable[[Any], bool], timeout_s: float) -> Any:
    """Poll batches.retrieve until `done(batch)`; a gateway that is down (restarting) is waited for."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            batch = client.batches.retrieve(batch_id)
            if done(batch):
                return batch
        except (openai.APIConnectionError, openai.InternalServerError):
            pass
        assert time.monotonic() < deadline, f"batch {batch_id} did not get there within {timeout_s:.0f}s"
        time.sleep(0.2)


def _outputs(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def _metric(url: str, name: str, labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (e.g. 'tier="batch"')."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    pattern = re.compile(rf"^{name}\{{([^}}]*)\}} (\S+)$", re.M)
    return sum(float(v) for lab, v in pattern.findall(text) if labels in lab)


class Interactive:
    """Interactive chat requests one after another on a thread, for as long as it runs."""

    def __init__(self, mesh: Mesh) -> None:
        self.client = _client(mesh, timeout=30)
        self.answered: list[float] = []  # when each was answered
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                reply = self.client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": f"quick {i}"}], max_tokens=4,
                    extra_headers={"X-Nitsum-Tier": "interactive"})
                assert reply.service_tier == "interactive" and reply.usage is not None
                self.answered.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - every failure is reported by the test
                self.failures.append(repr(e))

    def __enter__(self) -> Interactive:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def test_a_batch_of_200_runs_in_the_batch_tier_while_interactive_requests_flow(mesh: Mesh, tmp_path: Path) -> None:
    client = _client(mesh)
    lines = [_chat_line(i) for i in range(200)]
    dispatched_before = _metric(mesh.admin_url, "nitsum_router_dispatched_total", 'tier="batch"')
    with Interactive(mesh) as interactive:
        time.sleep(1.0)
        source = client.files.create(file=_jsonl(tmp_path / "in.jsonl", lines).open("rb"), purpose="batch")
        assert source.purpose == "batch" and source.bytes == (tmp_path / "in.jsonl").stat().st_size
        batch = client.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h",
                                      metadata={"suite": "e2e"})
        assert batch.status == "validating" and batch.metadata == {"suite": "e2e"}
        started = time.monotonic()
        seen = {batch.status}
        batch = _wait_batch(client, batch.id, lambda b: seen.add(b.status) or b.status == "completed", 300)
        ended = time.monotonic()
        during = [t for t in interactive.answered if started <= t <= ended]
    assert not interactive.failures, interactive.failures[:3]
    assert len(during) >= 10, f"only {len(during)} interactive requests answered during the batch"
    assert "in_progress" in seen and seen <= {"validating", "in_progress", "finalizing", "completed"}
    assert batch.request_counts.model_dump() == {"total": 200, "completed": 200, "failed": 0}
    assert batch.error_file_id is None and batch.in_progress_at and batch.completed_at
    assert _metric(mesh.admin_url, "nitsum_router_dispatched_total", 'tier="batch"') - dispatched_before == 200
    out = _outputs(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(200)]
    assert all(o["error"] is None and o["response"]["status_code"] == 200 and o["id"].startswith("batch_req_")
               and o["response"]["request_id"] == o["response"]["body"]["id"] for o in out)
    assert {o["response"]["body"]["service_tier"] for o in out} == {"batch"}
    assert batch.usage.output_tokens == sum(o["response"]["body"]["usage"]["completion_tokens"] for o in out)

    def one_by_one(line: dict[str, Any]) -> dict[str, Any]:
        body = dict(line["body"])
        extra = {"return_token_ids": body.pop("return_token_ids")}
        return client.chat.completions.create(**body, extra_body=extra).model_dump()["choices"][0]

    with ThreadPoolExecutor(4) as pool:
        singles = list(pool.map(one_by_one, lines))
    got = [o["response"]["body"]["choices"][0] for o in out]
    assert [(c["message"]["content"], c["token_ids"], c["finish_reason"]) for c in got] == \
        [(c["message"]["content"], c["token_ids"], c["finish_reason"]) for c in singles]


def test_cancel_mid_batch_stops_it_with_exact_counts(mesh: Mesh, tmp_path: Path) -> None:
    client = _client(mesh)
    lines = [_chat_line(i, max_tokens=48, ignore_eos=True) for i in range(300)]
    source = client.files.create(file=_jsonl(tmp_path / "long.jsonl", lines).open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h")
    _wait_batch(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 20, 120)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    batch = _wait_batch(client, batch.id, lambda b: b.status == "cancelled", 60)
    assert batch.cancelled_at and client.batches.cancel(batch.id).status == "cancelled"  # again: no change
    out, errors = _outputs(client, batch.output_file_id), _outputs(client, batch.error_file_id)
    counts = batch.request_counts
    assert counts.total == 300 and counts.completed == len(out) and counts.failed == len(errors) == 0
    assert 20 <= counts.completed < 300
    answered = _metric(mesh.url, "nitsum_requests_total", 'tier="batch"')
    time.sleep(3)  # nothing more of it runs: no request answered, the counts stay
    assert client.batches.retrieve(batch.id).request_counts == counts
    assert _metric(mesh.url, "nitsum_requests_total", 'tier="batch"') == answered
    small = client.files.create(file=_jsonl(tmp_path / "one.jsonl", [_chat_line(0)]).open("rb"), purpose="batch")
    done = client.batches.create(input_file_id=small.id, endpoint=CHAT, completion_window="24h")
    _wait_batch(client, done.id, lambda b: b.status == "completed", 60)
    with pytest.raises(openai.APIStatusError) as refused:  # a finished batch cannot be cancelled
        client.batches.cancel(done.id)
    assert refused.value.status_code == 409 and refused.value.response.json()["error"]["code"] == "batch_not_cancellable"


def test_a_gateway_killed_mid_batch_loses_nothing(mesh: Mesh, tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    client, tok = _client(mesh), reference.tokenizer
    prompts = [tok.encode(f"Once upon a time, story number {i} began") for i in range(200)]
    lines = [{"custom_id": f"story-{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny", "prompt": p, "max_tokens": 32, "temperature": 0, "return_token_ids": True}}
             for i, p in enumerate(prompts)]
    source = client.files.create(file=_jsonl(tmp_path / "stories.jsonl", lines).open("rb"), purpose="batch")
    dispatched_before = _metric(mesh.admin_url, "nitsum_router_dispatched_total", 'tier="batch"')
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/completions", completion_window="24h")
    part = _wait_batch(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 40, 120)
    assert part.request_counts.completed < 200, "the batch ended before the gateway could be killed"
    old = mesh.pid("gateway")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: mesh.restarts("gateway") >= 1 and mesh.pid("gateway") != old, 30, "the gateway's restart")
    batch = _wait_batch(client, batch.id, lambda b: b.status == "completed", 300)
    assert batch.request_counts.model_dump() == {"total": 200, "completed": 200, "failed": 0}
    out = _outputs(client, batch.output_file_id)
    assert [o["custom_id"] for o in out] == [f"story-{i}" for i in range(200)]  # each line once
    got = [o["response"]["body"]["choices"][0]["token_ids"] for o in out]
    assert all(len(ids) == o["response"]["body"]["usage"]["completion_tokens"] for ids, o in zip(got, out, strict=True))
    sample = range(0, 200, 8)  # the engine alone, one prompt at a time, is slow next to the batch
    assert [got[i] for i in sample] == [reference(prompts[i], 32) for i in sample]
    # Lines answered before the kill did not run again; the ones in flight were read back (or, if
    # the mesh no longer knew them, run again: at most one window of them).
    rerun = _metric(mesh.admin_url, "nitsum_router_dispatched_total", 'tier="batch"') - dispatched_before - 200
    assert 0 <= rerun <= 16, rerun
    assert client.files.retrieve(source.id).bytes == (tmp_path / "stories.jsonl").stat().st_size


def test_bad_input_gets_openai_errors_or_error_file_lines(mesh: Mesh, tmp_path: Path) -> None:
    client = _client(mesh)
    good = [_chat_line(i) for i in range(3)]
    mixed = [good[0], "{this is not json", {**_chat_line(10), "url": "/v1/embeddings"}, good[1],
             {**_chat_line(11), "body": {**_chat_line(11)["body"], "max_tokens": "many"}}, good[2]]
    source = client.files.create(file=_jsonl(tmp_path / "mixed.jsonl", mixed).open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h")
    batch = _wait_batch(client, batch.id, lambda b: b.status == "completed", 120)
    assert batch.request_counts.model_dump() == {"total": 6, "completed": 3, "failed": 3}
    assert [o["custom_id"] for o in _outputs(client, batch.output_file_id)] == ["req-0", "req-1", "req-2"]
    errors = _outputs(client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == [None, "req-10", "req-11"]
    assert [e["error"]["code"] for e in errors[:2]] == ["invalid_json_line", "invalid_url"]
    assert "line 2" in errors[0]["error"]["message"] and "/v1/embeddings" in errors[1]["error"]["message"]
    invalid = errors[2]["response"]
    assert errors[2]["error"] is None and invalid["status_code"] == 400
    assert invalid["body"]["error"]["param"] == "max_tokens"

    def refused(call: Callable[[], object], status: int) -> dict[str, Any]:
        with pytest.raises(openai.APIStatusError) as e:
            call()
        assert e.value.status_code == status, e.value.response.text
        body = e.value.response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        return body["error"]  # type: ignore[no-any-return]

    assert refused(lambda: client.batches.create(input_file_id=source.id, endpoint="/v1/embeddings",
                                                 completion_window="24h"), 400)["param"] == "endpoint"
    assert refused(lambda: client.batches.retrieve("batch_nope"), 404)["code"] == "batch_not_found"
    assert refused(lambda: client.files.retrieve("file-nope"), 404)["code"] == "file_not_found"
    assert refused(lambda: client.batches.create(input_file_id="file-nope", endpoint=CHAT,
                                                 completion_window="24h"), 404)["code"] == "file_not_found"
    big = tmp_path / "big.jsonl"
    with big.open("wb") as f:
        f.write((json.dumps(good[0]) + "\n").encode() * (MAX_FILE_BYTES // 200 + 1))
    assert big.stat().st_size > MAX_FILE_BYTES
    assert refused(lambda: client.files.create(file=big.open("rb"), purpose="batch"), 413)["code"] == "file_too_large"
    assert refused(lambda: client.files.create(file=_jsonl(tmp_path / "x.jsonl", good).open("rb"),
                                               purpose="fine-tune"), 400)["param"] == "purpose"
    other = openai.OpenAI(base_url=f"{mesh.url}/v1", api_key="sk-batch", max_retries=0)
    assert refused(lambda: other.files.retrieve(source.id), 404)["code"] == "file_not_found"  # another key's
    assert refused(lambda: other.batches.create(input_file_id=source.id, endpoint=CHAT, completion_window="24h",
                                                metadata={"nitsum_tier": "interactive"}), 403)["code"] == "tier_not_allowed"
