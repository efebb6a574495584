"""The gateway's last line: an exception no route turned into an ApiError becomes a logged 500 in
OpenAI's shape, counted in `nitsum_requests_total{outcome="error"}`, and goes no further.

Starlette's own ServerErrorMiddleware answers such an exception and then re-raises it, and the
server closes the connection without saying so: a keep-alive client's next request on it is
reset. Answered here, inside that middleware, the connection stays usable.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.metrics import GatewayMetrics

from .errors import internal

log = logging.getLogger("nitsum.gateway")


class InternalErrorGuard:
    """Pure ASGI middleware. `_serve` leaves `request_id` and, once resolved, `tier` in the request's
    state, so the log line and the counter name them."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, default_tier: str,
                 counted_paths: tuple[str, ...]) -> None:
        self.app = app
        self.metrics = metrics
        self.default_tier = default_tier
        self.counted_paths = counted_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            state: dict[str, Any] = scope.get("state") or {}
            request_id = str(state.get("request_id") or f"req-{uuid.uuid4().hex}")
            tier = state.get("tier")
            log.exception("internal error serving request %s (%s %s, tier %s)", request_id, scope.get("method"),
                          scope.get("path"), tier or "unresolved")
            if scope.get("path") in self.counted_paths:
                self.metrics.requests.labels(tier or self.default_tier, "error").inc()
            if started:
                raise  # part of the answer is out: only closing the connection can tell the client
            response = internal(request_id).response(tier)
            response.headers["X-Request-Id"] = request_id
            await response(scope, receive, send)
