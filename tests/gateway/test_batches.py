"""The Files and Batch API at the gateway, on a real redis-server, with the test answering for the
mesh: the shapes, the limits, bad lines, tiers, paging, cancel, a full queue, expiry."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis

from services.gateway.files import MAX_FILE_BYTES, MAX_FILE_LINES

CHAT = "/v1/chat/completions"
TIERS = ("interactive", "standard", "batch")


def _line(i: int, url: str = CHAT, **body: Any) -> dict[str, Any]:
    return {"custom_id": f"r{i}", "method": "POST", "url": url,
            "body": {"model": "tiny", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4, **body}}


def _upload(client: Any, lines: list[Any], headers: dict[str, str] | None = None, purpose: str = "batch") -> Any:
    data = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()
    return client.post("/v1/files", files={"file": ("in.jsonl", data, "application/jsonl")}, data={"purpose": purpose},
                       headers=headers or {})


def _batch(client: Any, file_id: str, headers: dict[str, str] | None = None, **extra: Any) -> Any:
    return client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h",
                                            **extra}, headers=headers or {})


def _until(client: Any, batch_id: str, done: Callable[[dict[str, Any]], bool], timeout_s: float = 20,
           headers: dict[str, str] | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.get(f"/v1/batches/{batch_id}", headers=headers or {}).json()
        if done(batch):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)


def _error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error  # type: ignore[no-any-return]


def test_a_file_is_uploaded_read_and_deleted_by_its_key_only(make_gateway, keys_doc) -> None:  # type: ignore[no-untyped-def]
    client, _ = make_gateway(keys_doc)
    mine, theirs = {"Authorization": "Bearer sk-all"}, {"Authorization": "Bearer sk-batch"}
    f = _upload(client, [_line(0), _line(1)], mine).json()
    assert f["object"] == "file" and f["purpose"] == "batch" and f["filename"] == "in.jsonl" and f["id"].startswith("file-")
    assert client.get(f"/v1/files/{f['id']}", headers=mine).json() == f
    content = client.get(f"/v1/files/{f['id']}/content", headers=mine).content
    assert len(content) == f["bytes"] and json.loads(content.splitlines()[1]) == _line(1)
    assert _error(client.get(f"/v1/files/{f['id']}", headers=theirs), 404)["code"] == "file_not_found"
    assert _error(client.get(f"/v1/files/{f['id']}"), 401)["code"] == "invalid_api_key"
    assert _error(client.delete(f"/v1/files/{f['id']}", headers=theirs), 404)["code"] == "file_not_found"
    assert client.delete(f"/v1/files/{f['id']}", headers=mine).json() == {"id": f["id"], "object": "file", "deleted": True}
    assert _error(client.get(f"/v1/files/{f['id']}/content", headers=mine), 404)["code"] == "file_not_found"


def test_uploads_past_the_limits_or_not_jsonl_are_refused(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    assert _error(_upload(client, [_line(0)], purpose="fine-tune"), 400)["param"] == "purpose"
    assert _error(_upload(client, ["", "  "]), 400)["code"] == "empty_file"
    assert _error(_upload(client, ["{}"] * (MAX_FILE_LINES + 1)), 400)["code"] == "too_many_requests"
    big = client.post("/v1/files", files={"file": ("big.jsonl", b"x" * (MAX_FILE_BYTES + 1))}, data={"purpose": "batch"})
    error = _error(big, 413)
    assert error["code"] == "file_too_large" and "32 MiB" in error["message"]
    assert _error(client.post("/v1/files", files={"file": ("a.jsonl", b"\xff\xfe{}\n")}, data={"purpose": "batch"}),
                  400)["code"] == "invalid_file"
    assert _error(client.post("/v1/files", json={"purpose": "batch"}), 400)["code"] == "invalid_content_type"
    assert _error(client.post("/v1/files", data={"purpose": "batch"}, files={"other": ("x", b"1")}), 400)["param"] == "file"
    bad_form = client.post("/v1/files", content=b"--zz\r\nno headers end", headers={"content-type": "multipart/form-data; boundary=zz"})
    assert _error(bad_form, 400)["code"] == "invalid_multipart"


def test_a_batch_answers_good_lines_and_files_bad_ones(make_gateway, codec, responder) -> None:  # type: ignore[no-untyped-def]
    client, mesh = make_gateway()
    mesh.ready()
    lines = [_line(0), "[1, 2", {**_line(1), "method": "GET"}, {**_line(2), "url": "/v1/completions"}, _line(0),
             _line(3, max_tokens="x"), _line(4, model="gpt-4"), {"custom_id": "r5", "method": "POST", "url": CHAT},
             _line(6, stream=True), _line(7, return_token_ids=True)]
    file_id = _upload(client, lines).json()["id"]
    tokens = codec.encode("one two", add_special_tokens=False)
    with responder(mesh, TIERS, tokens, finish="stop") as answering:
        r = _batch(client, file_id, metadata={"team": "a"})
        assert r.status_code == 200 and r.headers["X-Nitsum-Tier"] == "batch"
        created = r.json()
        assert created["status"] == "validating" and created["metadata"] == {"team": "a"}
        assert created["expires_at"] == created["created_at"] + 24 * 3600
        batch = _until(client, created["id"], lambda b: b["status"] == "completed")
    assert {q.tier for q in answering.seen} == {"batch"} and len(answering.seen) == 2
    assert batch["request_counts"] == {"total": 10, "completed": 2, "failed": 8}
    assert batch["usage"]["output_tokens"] == 2 * len(tokens)
    out = [json.loads(x) for x in client.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()]
    assert [o["custom_id"] for o in out] == ["r0", "r7"]
    assert out[1]["response"]["body"]["choices"][0]["token_ids"] == tokens
    assert out[0]["response"]["body"]["choices"][0]["message"]["content"] == codec.decode(tokens)
    errors = [json.loads(x) for x in client.get(f"/v1/files/{batch['error_file_id']}/content").text.splitlines()]
    codes = [(e["custom_id"], e["error"]["code"] if e["error"] else e["response"]["status_code"]) for e in errors]
    assert codes == [(None, "invalid_json_line"), ("r1", "invalid_method"), ("r2", "invalid_url"),
                     ("r0", "duplicate_custom_id"), ("r3", 400), ("r4", 404), ("r5", "invalid_body"), ("r6", 400)]
    assert errors[4]["response"]["body"]["error"]["param"] == "max_tokens"
    assert errors[7]["response"]["body"]["error"]["param"] == "stream"
    f = client.get(f"/v1/files/{batch['output_file_id']}").json()
    assert f["purpose"] == "batch_output" and f["filename"] == f"{batch['id']}_output.jsonl"


def test_batch_create_refuses_what_it_cannot_run(make_gateway, keys_doc) -> None:  # type: ignore[no-untyped-def]
    client, _ = make_gateway(keys_doc)
    auth, batch_only = {"Authorization": "Bearer sk-all"}, {"Authorization": "Bearer sk-batch"}
    file_id = _upload(client, [_line(0)], auth).json()["id"]
    assert _error(client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/embeddings",
                                                   "completion_window": "24h"}, headers=auth), 400)["param"] == "endpoint"
    assert _error(_batch(client, file_id, auth, completion_window="1h"), 400)["param"] == "completion_window"
    assert _error(_batch(client, "file-nope", auth), 404)["code"] == "file_not_found"
    assert _error(_batch(client, file_id, batch_only), 404)["code"] == "file_not_found"  # another key's file
    assert _error(_batch(client, file_id, auth, metadata={"nitsum_tier": "gold"}), 400)["code"] == "unknown_tier"
    assert _error(_batch(client, file_id, batch_only, metadata={"nitsum_tier": "interactive"}), 403)["code"] == \
        "tier_not_allowed"
    assert _error(_batch(client, file_id, auth, metadata={"k": 1}), 400)["param"] == "metadata"
    assert _error(_batch(client, file_id, auth, output_expires_after={"anchor": "created_at", "seconds": 3600}),
                  400)["code"] == "unsupported_parameter"
    assert _error(client.post("/v1/batches", content=b"{", headers=auth), 400)["code"] == "invalid_json"
    assert _error(client.get("/v1/batches/batch_nope", headers=auth), 404)["code"] == "batch_not_found"
    assert _error(client.post("/v1/batches/batch_nope/cancel", headers=auth), 404)["code"] == "batch_not_found"
    assert _batch(client, file_id, auth, metadata={"nitsum_tier": "standard"}).headers["X-Nitsum-Tier"] == "standard"


def test_batches_list_newest_first_in_pages(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    file_id = _upload(client, [_line(0)]).json()["id"]
    ids = []
    for _ in range(5):
        ids.append(_batch(client, file_id).json()["id"])
    ids.reverse()
    first = client.get("/v1/batches", params={"limit": 2}).json()
    assert first["object"] == "list" and [b["id"] for b in first["data"]] == ids[:2] and first["has_more"]
    assert first["first_id"] == ids[0] and first["last_id"] == ids[1]
    rest = client.get("/v1/batches", params={"limit": 10, "after": ids[1]}).json()
    assert [b["id"] for b in rest["data"]] == ids[2:] and not rest["has_more"]
    assert client.get("/v1/batches").json()["data"][0]["id"] == ids[0]
    assert _error(client.get("/v1/batches", params={"limit": 0}), 400)["param"] == "limit"
    assert _error(client.get("/v1/batches", params={"after": "batch_nope"}), 404)["param"] == "after"


def test_cancel_stops_a_batch_and_frees_its_requests(make_gateway, redis_server) -> None:  # type: ignore[no-untyped-def]
    client, mesh = make_gateway()
    mesh.ready()  # nobody answers: the first lines stay in flight
    file_id = _upload(client, [_line(i) for i in range(40)]).json()["id"]
    batch = _batch(client, file_id).json()
    _until(client, batch["id"], lambda b: b["status"] == "in_progress" and len(mesh.queued("batch")) == 16)
    assert _error(client.delete(f"/v1/files/{file_id}"), 409)["code"] == "file_in_use"
    r = client.post(f"/v1/batches/{batch['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    done = _until(client, batch["id"], lambda b: b["status"] == "cancelled")
    assert done["request_counts"] == {"total": 40, "completed": 0, "failed": 0}
    assert done["output_file_id"] is None and done["cancelled_at"] >= done["cancelling_at"]
    r = redis.Redis.from_url(redis_server.url)
    cancelled = [q.request_id for q in mesh.queued("batch") if r.exists(f"{mesh.prefix}cancelled:{q.request_id}")]
    assert len(cancelled) == 16  # the mesh drops them
    assert len(mesh.queued("batch")) == 16  # and no more were queued
    assert client.post(f"/v1/batches/{batch['id']}/cancel").json()["status"] == "cancelled"


def test_a_full_tier_queue_holds_a_batch_back_without_failing_it(make_gateway, codec, responder) -> None:  # type: ignore[no-untyped-def]
    doc = {"tiers": [{"name": "standard", "ttft_s": 2, "tpot_s": 0.1},
                     {"name": "tight", "ttft_s": 1, "tpot_s": 0.5, "queue_limit": 2}]}
    client, mesh = make_gateway(doc)
    mesh.ready()
    file_id = _upload(client, [_line(i) for i in range(12)]).json()["id"]
    batch = _batch(client, file_id, metadata={"nitsum_tier": "tight"}).json()
    _until(client, batch["id"], lambda b: len(mesh.queued("tight")) == 2)
    time.sleep(1.0)  # the other lines meet a full queue (429) meanwhile and wait, never past the limit
    assert len(mesh.queued("tight")) == 2
    assert client.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["failed"] == 0
    with responder(mesh, ("tight",), codec.encode("ok", add_special_tokens=False)) as answering:
        done = _until(client, batch["id"], lambda b: b["status"] == "completed", timeout_s=60)
    assert done["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    assert len(answering.seen) == 12


def test_a_batch_past_its_window_expires_with_its_unanswered_lines_in_the_error_file(make_gateway, redis_server) -> None:  # type: ignore[no-untyped-def]
    client, mesh = make_gateway()
    mesh.ready()  # nobody answers
    file_id = _upload(client, [_line(i) for i in range(5)]).json()["id"]
    batch = _batch(client, file_id).json()
    _until(client, batch["id"], lambda b: b["status"] == "in_progress")
    redis.Redis.from_url(redis_server.url).hset(f"{mesh.prefix}batch:{batch['id']}", "expires_at", int(time.time()) - 1)
    done = _until(client, batch["id"], lambda b: b["status"] == "expired")
    assert done["request_counts"] == {"total": 5, "completed": 0, "failed": 5} and done["expired_at"]
    errors = client.get(f"/v1/files/{done['error_file_id']}/content").text.splitlines()
    assert [json.loads(e)["error"]["code"] for e in errors] == ["batch_expired"] * 5
    assert client.delete(f"/v1/files/{file_id}").json()["deleted"]  # the batch is over: its input may go
