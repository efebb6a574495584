"""The HTTP front door: OpenAI-compatible completions and chat over the mesh.

A request is validated (400), its tier resolved (401/403/400), the mesh's readiness checked
(503), its prompt tokenized and measured against the context (400), then it is put on its
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
from services.config import GatewayConfig
from services.metrics import CONTENT_TYPE, GatewayMetrics
from services.rpc import pb
from services.tasks import TaskSet

from .codec import TextCodec
from .errors import ApiError, bad_request, not_found
from .protocol import ChatCompletionRequest, CompletionRequest, ResponseShape, parse_body
from .resolve import resolve_tier
from .streaming import RequestRun, collect, sse_response
from .upstream import Upstream

log = logging.getLogger("nitsum.gateway")
T = TypeVar("T")


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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        yield
        await gw.stop()

    app = FastAPI(title="Nitsum gateway", lifespan=lifespan)
    app.state.gateway = gw
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        assert gw.upstream is not None
        groups = await gw.upstream.groups()
        roles = {g.role for g in groups}
        ready = {"prefill", "decode"} <= roles
        body = {"status": "ok" if ready else "starting", "ready": ready,
                "groups": [{"group_id": g.group_id, "role": g.role, "tp": g.tp, "epoch": g.epoch} for g in groups]}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        assert gw.cluster is not None and gw.upstream is not None
        for tier in config.policy.names:
            gw.metrics.queue_depth.labels(tier).set(await gw.cluster.queue_depth(tier))
        gw.metrics.groups.replace_all(await gw.cluster.groups())
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.served_model_name, "object": "model",
                                            "created": 0, "owned_by": "nitsum"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(gw, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(gw, request, chat=True)

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

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return ApiError(500, "internal error; it has been logged", "server_error", None, "internal_error").response()


async def _serve(gw: Gateway, request: Request, chat: bool) -> Response:
    arrival = time.time()
    tier: str | None = None
    try:
        body = parse_body(await request.body(), ChatCompletionRequest if chat else CompletionRequest)
        tier = resolve_tier(gw.config.policy, request.headers.get("authorization"),
                            request.headers.get("x-nitsum-tier"), body.service_tier)
        if body.model != gw.config.served_model_name:
            raise not_found(f"model {body.model!r} is not served here; use {gw.config.served_model_name!r}",
                            "model", "model_not_found")
        assert gw.upstream is not None
        max_model_len = await gw.upstream.ready()
        prompt_ids = _prompt_ids(gw.codec, body, chat)
        max_tokens = _max_tokens(body, chat, len(prompt_ids), max_model_len)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        queued = pb.QueuedRequest(request_id=rid, tier=tier, arrival_s=arrival, prompt_ids=prompt_ids,
                                  sampling=_sampling(body, max_tokens))
        await gw.upstream.submit(queued)
    except ApiError as e:
        gw.metrics.requests.labels(tier or gw.config.policy.default_tier, _outcome(e.status)).inc()
        return e.response(tier)
    gw.metrics.prompt_tokens.labels(tier).inc(len(prompt_ids))
    run = RequestRun(gw.upstream, gw.codec, gw.metrics, gw.config.policy.tier(tier), queued,
                     ResponseShape(rid, gw.config.served_model_name, tier, chat), body.stops)
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


def _prompt_ids(codec: TextCodec, body: Any, chat: bool) -> list[int]:
    if chat:
        try:
            ids = codec.apply_chat_template(body.template_messages(), add_generation_prompt=True)
        except ValueError as e:  # the template refused the conversation (or there is none)
            raise bad_request(str(e), "messages") from e
    else:
        prompt = body.prompt_value()
        if isinstance(prompt, str):
            ids = codec.encode(prompt, add_special_tokens=True)
        elif any(not isinstance(t, int) or t < 0 for t in prompt):
            raise bad_request("prompt token ids must be non-negative integers", "prompt")
        else:
            ids = list(prompt)
    if not ids:
        raise bad_request("prompt is empty", "messages" if chat else "prompt")
    return ids


def _max_tokens(body: Any, chat: bool, prompt_len: int, max_model_len: int) -> int:
    requested = body.token_budget if chat else body.max_tokens
    max_tokens = requested if requested is not None else (max_model_len - prompt_len if chat else 16)
    if prompt_len + max(max_tokens, 1) > max_model_len:
        raise bad_request(f"this model's maximum context length is {max_model_len} tokens; the request has "
                          f"{prompt_len} prompt tokens and asks for {max_tokens} more",
                          "messages" if chat else "prompt", "context_length_exceeded")
    return max_tokens


def _sampling(body: Any, max_tokens: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                             top_p=body.top_p, has_seed=body.seed is not None, seed=body.seed or 0,
                             ignore_eos=body.ignore_eos)


def _outcome(status: int) -> str:
    return {400: "bad_request", 404: "bad_request", 401: "unauthorized", 403: "forbidden", 429: "shed",
            503: "unavailable"}.get(status, "error")
