"""The HTTP front door: OpenAI-compatible completions and chat over the mesh.

A request's API key is checked (401), its body read (413 past the size limit) and validated (400),
its tier resolved (403/400), the mesh's readiness checked (503), its prompt tokenized off the event
loop and measured against the context (400), then it is put on its
tier's Redis stream (429 if that queue is full) and its tokens are read back from its own
output stream, detokenized, and returned whole or as SSE chunks. A client that goes away
mid-stream cancels the request, which frees its slot in the batch and its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from services.cluster import ClusterClient
from services.cluster.client import REDIS_ERRORS
from services.config import GatewayConfig
from services.metrics import CONTENT_TYPE, GatewayMetrics
from services.tasks import TaskSet

from .admission import queued_request
from .batch_service import BatchService
from .batches import register_batch_api
from .codec import TextCodec
from .errors import ApiError, bad_request, outcome_of
from .guard import InternalErrorGuard
from .limits import read_body
from .openapi import RESPONSES, request_body
from .protocol import ChatCompletionRequest, CompletionRequest, ResponseShape, parse_body
from .resolve import authenticate, choose_tier
from .streaming import RequestRun, collect, sse_response
from .upstream import Upstream

log = logging.getLogger("nitsum.gateway")
_INLINE_BODY_BYTES = 16 << 10  # bodies up to this size are parsed and tokenized on the event loop
T = TypeVar("T")
SERVING_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class Gateway:
    config: GatewayConfig
    codec: TextCodec
    metrics: GatewayMetrics
    tasks: TaskSet = field(default_factory=lambda: TaskSet("gateway"))
    cluster: ClusterClient | None = None
    upstream: Upstream | None = None

    async def start(self) -> None:
        self.cluster = ClusterClient(self.config.redis.url, self.config.redis.prefix)
        await self.cluster.ensure_queues(list(self.config.policy.names))
        self.upstream = Upstream(self.config, self.cluster, self.tasks)

    async def stop(self) -> None:
        await self.tasks.cancel_all()
        if self.cluster is not None:
            await self.cluster.close()


def create_app(config: GatewayConfig, codec: TextCodec) -> FastAPI:
    gw = Gateway(config, codec, GatewayMetrics(config.policy.names))
    batch_service = BatchService(config, codec, gw.metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        async with batch_service.serving(gw.cluster, gw.upstream):
            yield
        await gw.stop()

    app = FastAPI(title="Nitsum gateway", lifespan=lifespan)
    app.state.gateway = gw
    _install_error_handlers(app)
    app.add_middleware(InternalErrorGuard, metrics=gw.metrics, default_tier=config.policy.default_tier,
                       counted_paths=SERVING_PATHS)

    @app.get("/health")
    async def health() -> Response:
        assert gw.upstream is not None
        try:
            groups = await gw.upstream.groups(fresh=True)
            await gw.upstream.look_for_router()
        except REDIS_ERRORS:
            return JSONResponse({"status": "unavailable", "ready": False, "missing": ["redis"], "groups": []}, 503)
        missing = gw.upstream.missing(groups, 0.0)  # what serves right now, no grace
        body = {"status": "ok" if not missing else "degraded" if groups else "starting", "ready": not missing,
                "missing": missing, "router": gw.upstream.router_leading,
                "groups": [{"group_id": g.group_id, "role": g.role, "tp": g.tp, "epoch": g.epoch} for g in groups]}
        return JSONResponse(body, status_code=200 if not missing else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        assert gw.cluster is not None and gw.upstream is not None
        try:
            for tier in config.policy.names:
                gw.metrics.queue_depth.labels(tier).set(await gw.cluster.queue_depth(tier))
            gw.metrics.groups.replace_all(await gw.cluster.groups())
            gw.metrics.restarts.counts = await gw.cluster.restarts()
        except REDIS_ERRORS:
            log.warning("/metrics: Redis is unreachable; serving the gateway's own series only")
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.served_model_name, "object": "model",
                                            "created": 0, "owned_by": "nitsum"}]}

    @app.post("/v1/completions", responses=RESPONSES,
              openapi_extra=request_body(CompletionRequest, config, codec))
    async def completions(request: Request) -> Response:
        return await _serve(gw, request, chat=False)

    @app.post("/v1/chat/completions", responses=RESPONSES,
              openapi_extra=request_body(ChatCompletionRequest, config, codec))
    async def chat_completions(request: Request) -> Response:
        return await _serve(gw, request, chat=True)

    register_batch_api(app, config, batch_service)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return bad_request(str(exc.errors()[0].get("msg", "invalid request"))).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response()
    # Other exceptions: InternalErrorGuard (an `Exception` handler here would answer, then re-raise).


async def _serve(gw: Gateway, request: Request, chat: bool) -> Response:
    arrival = time.time()
    tier: str | None = None
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    request.state.request_id = rid  # for InternalErrorGuard's log line
    try:
        grant = authenticate(gw.config.policy, request.headers.get("authorization"))  # before any parsing
        raw = await read_body(request, gw.config.max_body_bytes)
        # Parsing and tokenizing take time in proportion to the body: a big one goes off the loop,
        # which other requests' tokens flow through; a small one is quicker done here than handed
        # to a thread (under a flood, the threads' queue would hold an interactive request back).
        offload = len(raw) > _INLINE_BODY_BYTES
        kind = ChatCompletionRequest if chat else CompletionRequest
        body = await asyncio.to_thread(parse_body, raw, kind) if offload else parse_body(raw, kind)
        tier = choose_tier(gw.config.policy, grant, request.headers.get("x-nitsum-tier"), body.service_tier)
        request.state.tier = tier
        assert gw.upstream is not None
        queued = await queued_request(gw.config, gw.codec, gw.upstream, body, chat, tier, rid, arrival, offload)
        prompt_ids = queued.prompt_ids
        entry_id = await gw.upstream.submit(queued)
    except ApiError as e:
        gw.metrics.requests.labels(tier or gw.config.policy.default_tier, _outcome(e.status)).inc()
        return e.response(tier)
    gw.metrics.prompt_tokens.labels(tier).inc(len(prompt_ids))
    run = RequestRun(gw.upstream, gw.codec, gw.metrics, gw.config.policy.tier(tier), queued, entry_id,
                     ResponseShape(rid, gw.config.served_model_name, tier, chat, bool(body.return_token_ids)),
                     body.stops)
    headers = {"X-Nitsum-Tier": tier, "X-Request-Id": rid}
    try:
        first = await _unless_gone(request, run.first_event())
    except ApiError as e:
        run.record(_outcome(e.status))
        return e.response(tier)
    except ClientGone:
        run.record("cancelled")
        run.upstream.cancel(rid)
        return Response(status_code=499)
    if body.stream:
        return sse_response(run, first, body.include_usage, headers)
    try:
        return await _unless_gone(request, collect(run, first, headers))  # collect frees the request if cancelled
    except ClientGone:
        run.record("cancelled")
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _unless_gone(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then raise ClientGone)."""

    async def client_gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    working = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not working.done():
            working.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await working
    if working.cancelled():
        raise ClientGone()
    return working.result()


def _outcome(status: int) -> str:
    return outcome_of(status)

