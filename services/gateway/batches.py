"""OpenAI's Batch API: `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches` (newest first,
`after` / `limit` pages), `POST /v1/batches/{id}/cancel`, in OpenAI's shapes.

A batch's requests run in the `batch` tier, or in the tier `metadata.nitsum_tier` names if the API
key may use it (403 otherwise, as for a request). Creating a batch only stores it: a gateway's
batch runner (batch_service.py) takes it and runs it (batch_run.py); any gateway answers for it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from services.cluster.batch_store import BatchRecord, BatchStore, BatchView
from services.config import ApiKeyPolicy, GatewayConfig, TierPolicy

from .batch_input import ENDPOINTS
from .batch_service import BatchService
from .errors import ApiError, bad_request, forbidden, not_found, unsupported
from .files import owned_file, owner_of, register_files
from .limits import check_unicode, decode_json_text, read_body
from .resolve import authenticate

COMPLETION_WINDOW_S = {"24h": 24 * 3600}
TIER_KEY = "nitsum_tier"  # metadata key naming the tier a batch runs in
MAX_METADATA = (16, 64, 512)  # pairs, key length, value length (OpenAI's)
CREATE_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["input_file_id", "endpoint", "completion_window"],
    "properties": {"input_file_id": {"type": "string"}, "endpoint": {"type": "string", "enum": list(ENDPOINTS)},
                   "completion_window": {"type": "string", "enum": list(COMPLETION_WINDOW_S)},
                   "metadata": {"type": ["object", "null"], "maxProperties": MAX_METADATA[0],
                                "additionalProperties": {"type": "string", "maxLength": MAX_METADATA[2]},
                                "description": f"{TIER_KEY}: the tier to run in (default batch)"}}}}}}}
NO_BODY = {"requestBody": {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {}, "additionalProperties": False,
    "description": "none: cancelling takes no parameters (a body is ignored)"}}}}}


def batch_object(view: BatchView) -> dict[str, Any]:
    r = view.record
    return {
        "id": r.batch_id, "object": "batch", "endpoint": r.endpoint, "model": r.model or None,
        "errors": {"object": "list", "data": json.loads(r.errors)} if r.errors else None,
        "input_file_id": r.input_file_id, "completion_window": r.completion_window, "status": r.status,
        "output_file_id": r.output_file_id or None, "error_file_id": r.error_file_id or None,
        "created_at": r.created_at, "in_progress_at": r.in_progress_at or None, "expires_at": r.expires_at or None,
        "finalizing_at": r.finalizing_at or None, "completed_at": r.completed_at or None,
        "failed_at": r.failed_at or None, "expired_at": r.expired_at or None,
        "cancelling_at": r.cancelling_at or None, "cancelled_at": r.cancelled_at or None,
        "request_counts": {"total": r.total, "completed": view.completed, "failed": view.failed},
        "metadata": json.loads(r.metadata),
        "usage": {"input_tokens": r.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": r.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": r.input_tokens + r.output_tokens},
    }


def _answer(view: BatchView) -> Response:
    return JSONResponse(batch_object(view), headers={"X-Nitsum-Tier": view.record.tier})


def batch_tier(policy: TierPolicy, grant: ApiKeyPolicy | None, metadata: dict[str, str]) -> str:
    """The tier the batch runs in: `batch` (or what `flex` maps to), or the one metadata names;
    400 for an unknown tier, 403 for one the key may not use."""
    name = metadata.get(TIER_KEY)
    if name is None:
        name = "batch" if "batch" in policy.names else policy.service_tiers.get("flex", policy.default_tier)
    elif name not in policy.names:
        raise bad_request(f"metadata.{TIER_KEY}: unknown tier {name[:100]!r}; tiers are {', '.join(policy.names)}",
                          f"metadata.{TIER_KEY}", "unknown_tier")
    allowed = grant.tiers if grant is not None else policy.names
    if name not in allowed:
        raise forbidden(f"this API key may not use tier {name!r}; it may use {', '.join(allowed)} "
                        f"(name one in metadata.{TIER_KEY})")
    return name


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    pairs, key_len, value_len = MAX_METADATA
    if (not isinstance(value, dict) or len(value) > pairs
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= key_len and len(v) <= value_len
                       for k, v in value.items())):
        raise bad_request(f"metadata: at most {pairs} pairs of strings, keys up to {key_len} characters, values "
                          f"up to {value_len}", "metadata", "invalid_value")
    return value


async def _body(request: Request, limit: int) -> dict[str, Any]:
    text = decode_json_text(await read_body(request, limit))
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(doc, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    check_unicode(text, doc)
    return doc


async def _create(config: GatewayConfig, service: BatchService, request: Request) -> Response:
    policy, store = config.policy, service.store_of()
    grant = authenticate(policy, request.headers.get("authorization"))
    owner = owner_of(policy, request.headers.get("authorization"))
    doc = await _body(request, config.max_body_bytes)
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(doc.get(name), str):
            raise bad_request(f"{name}: a string is required", name, "missing_required_parameter")
    if doc["endpoint"] not in ENDPOINTS:
        raise bad_request(f"endpoint {doc['endpoint'][:100]!r} is not batched here; use one of "
                          f"{', '.join(ENDPOINTS)}", "endpoint", "unsupported_value")
    if doc["completion_window"] not in COMPLETION_WINDOW_S:
        raise bad_request(f"completion_window {doc['completion_window'][:20]!r}: only '24h' is supported",
                          "completion_window", "invalid_value")
    if doc.get("output_expires_after") is not None:
        raise unsupported("output_expires_after", "output_expires_after is not supported by this server: a "
                          "batch's files stay until deleted")
    metadata = _metadata(doc.get("metadata"))
    tier = batch_tier(policy, grant, metadata)
    source = await owned_file(store, owner, doc["input_file_id"])
    if source.purpose != "batch":
        raise bad_request(f"file {source.file_id} has purpose {source.purpose!r}; a batch reads a file uploaded "
                          "with purpose 'batch'", "input_file_id", "invalid_input_file")
    now = int(time.time())
    record = BatchRecord(f"batch_{uuid.uuid4().hex[:24]}", owner, doc["endpoint"], source.file_id,
                         doc["completion_window"], tier, "validating", now,
                         now + COMPLETION_WINDOW_S[doc["completion_window"]],
                         json.dumps(doc.get("metadata")), model=config.served_model_name)
    await store.create_batch(record)
    service.wake()
    return _answer(BatchView(record, 0, 0))


async def _owned(store: BatchStore, owner: str, batch_id: str) -> BatchView:
    view = await store.view(batch_id)
    if view is None or view.record.owner != owner:
        raise not_found(f"no batch with id {batch_id[:100]!r}", "batch_id", "batch_not_found")
    return view


def _limit(raw: str | None) -> int:
    if raw is None:
        return 20
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise bad_request(f"limit {raw[:20]!r}: an integer from 1 to 100", "limit", "invalid_value")
    return int(raw)


def register_batch_api(app: FastAPI, config: GatewayConfig, service: BatchService) -> None:
    """Add the Files and Batch API's routes."""
    policy = config.policy
    register_files(app, policy, service.store_of)

    @app.post("/v1/batches", openapi_extra=CREATE_BODY)
    async def create_batch(request: Request) -> Response:
        return await _create(config, service, request)

    @app.get("/v1/batches/{batch_id}")
    async def retrieve_batch(batch_id: str, request: Request) -> Response:
        owner = owner_of(policy, request.headers.get("authorization"))
        return _answer(await _owned(service.store_of(), owner, batch_id))

    @app.get("/v1/batches")
    async def list_batches(request: Request) -> Response:
        owner = owner_of(policy, request.headers.get("authorization"))
        limit, after = _limit(request.query_params.get("limit")), request.query_params.get("after")
        page = await service.store_of().list_batches(owner, after, limit)
        if page is None:
            raise not_found(f"after: no batch with id {str(after)[:100]!r}", "after", "batch_not_found")
        views, more = page
        data = [batch_object(v) for v in views]
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": more})

    @app.post("/v1/batches/{batch_id}/cancel", openapi_extra=NO_BODY)
    async def cancel_batch(batch_id: str, request: Request) -> Response:
        store = service.store_of()
        owner = owner_of(policy, request.headers.get("authorization"))
        await _owned(store, owner, batch_id)
        done, status = await store.transition(batch_id, ("validating", "in_progress"),
                                              {"status": "cancelling", "cancelling_at": int(time.time())})
        if not done and status not in ("cancelling", "cancelled"):
            raise ApiError(409, f"batch {batch_id} is {status}; only a validating or in-progress batch can be "
                           "cancelled", "invalid_request_error", "batch_id", "batch_not_cancellable")
        return _answer(await _owned(store, owner, batch_id))
