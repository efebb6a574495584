"""OpenAI's Files API, for the Batch API's input and output: upload (`POST /v1/files`, multipart,
purpose `batch`), `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}`.

Files live in Redis (services/cluster/batch_store.py), so every gateway of the mesh serves them and
a restart keeps them. Limits, smaller than OpenAI's (200 MB, 50,000 requests), because the file and
the batch's output are held in Redis's memory and in its append-only file: an upload is at most
`MAX_FILE_BYTES` (32 MiB, 413 past it) and `MAX_FILE_LINES` requests (50,000, as OpenAI; 400 past
it). A file is seen only with the API key that uploaded it (404 for another key).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from services.cluster.batch_store import FINAL_STATUSES, BatchStore, FileRecord
from services.config import TierPolicy

from .errors import ApiError, bad_request, not_found
from .limits import read_body
from .multipart import boundary_of, parse_form
from .resolve import authenticate, bearer_key

MAX_FILE_BYTES = 32 << 20
MAX_FILE_LINES = 50_000
_MULTIPART_SLACK = 64 << 10  # the form's own bytes around the file: boundaries, headers, purpose
PURPOSES = ("batch",)
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "JSONL, one request a line"},
                   "purpose": {"type": "string", "enum": list(PURPOSES)}}}}}}}


def owner_of(policy: TierPolicy, authorization: str | None) -> str:
    """Who owns what a request creates: a digest of its API key (401 for an unknown key), or
    "open" when the server has no keys (everything is everyone's)."""
    if authenticate(policy, authorization) is None:
        return "open"
    key = bearer_key(authorization) or ""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def file_too_large() -> ApiError:
    return ApiError(413, f"the file is larger than the {MAX_FILE_BYTES} bytes ({MAX_FILE_BYTES >> 20} MiB) this "
                    "server accepts for a batch; split it into several batches", "invalid_request_error", "file",
                    "file_too_large")


def file_object(f: FileRecord) -> dict[str, Any]:
    return {"id": f.file_id, "object": "file", "bytes": f.bytes, "created_at": f.created_at, "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "expires_at": None, "status_details": None}


def count_lines(data: bytes) -> int:
    """Requests in a JSONL file: its lines that are not blank."""
    return sum(1 for line in data.split(b"\n") if line.strip())


async def _upload(store: BatchStore, policy: TierPolicy, request: Request) -> Response:
    owner = owner_of(policy, request.headers.get("authorization"))
    boundary = boundary_of(request.headers.get("content-type"))
    try:
        raw = await read_body(request, MAX_FILE_BYTES + _MULTIPART_SLACK)
    except ApiError as e:
        raise file_too_large() if e.status == 413 else e from None
    fields = {p.name: p for p in parse_form(raw, boundary)}
    purpose = fields["purpose"].data.decode("utf-8", "replace") if "purpose" in fields else None
    if purpose is None:
        raise bad_request("purpose: a file needs a purpose; this server takes 'batch'", "purpose",
                          "missing_required_parameter")
    if purpose not in PURPOSES:
        raise bad_request(f"purpose {purpose[:100]!r} is not supported here; this server takes files for the Batch "
                          "API only: purpose 'batch'", "purpose", "invalid_value")
    file = fields.get("file")
    if file is None or file.filename is None:
        raise bad_request("file: the form has no file field", "file", "missing_required_parameter")
    data = file.data
    if len(data) > MAX_FILE_BYTES:
        raise file_too_large()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the file is not UTF-8 text ({e.reason} at byte {e.start}); a batch file is JSONL",
                          "file", "invalid_file") from e
    lines = count_lines(data)
    if lines == 0:
        raise bad_request("the file is empty: a batch file holds one request per line (JSONL)", "file", "empty_file")
    if lines > MAX_FILE_LINES:
        raise bad_request(f"the file holds {lines} requests; a batch takes at most {MAX_FILE_LINES}: split it",
                          "file", "too_many_requests")
    record = FileRecord(f"file-{uuid.uuid4().hex[:24]}", owner, file.filename[:255], purpose, len(data),
                        int(time.time()), lines)
    await store.put_file(record, data)
    return JSONResponse(file_object(record))


async def owned_file(store: BatchStore, owner: str, file_id: str) -> FileRecord:
    record = await store.file(file_id)
    if record is None or record.owner != owner:
        raise not_found(f"no file with id {file_id[:100]!r}", "file_id", "file_not_found")
    return record


def register_files(app: FastAPI, policy: TierPolicy, store_of: Callable[[], BatchStore]) -> None:
    """Add the Files API's routes; `store_of()` gives the BatchStore once the gateway has started."""

    @app.post("/v1/files", openapi_extra=UPLOAD_BODY)
    async def create_file(request: Request) -> Response:
        return await _upload(store_of(), policy, request)

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str, request: Request) -> Response:
        owner = owner_of(policy, request.headers.get("authorization"))
        return JSONResponse(file_object(await owned_file(store_of(), owner, file_id)))

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request) -> Response:
        store = store_of()
        await owned_file(store, owner_of(policy, request.headers.get("authorization")), file_id)
        content = await store.file_content(file_id)
        if content is None:
            raise not_found(f"no file with id {file_id[:100]!r}", "file_id", "file_not_found")
        return Response(content, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request) -> Response:
        store = store_of()
        await owned_file(store, owner_of(policy, request.headers.get("authorization")), file_id)
        for batch_id in await store.active_batches():
            batch = await store.batch(batch_id)
            if batch is not None and batch.input_file_id == file_id and batch.status not in FINAL_STATUSES:
                raise ApiError(409, f"file {file_id} is the input of batch {batch_id}, which is {batch.status}; "
                               "cancel the batch or let it finish first", "invalid_request_error", "file_id",
                               "file_in_use")
        await store.delete_file(file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})
