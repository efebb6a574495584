"""Errors at the gateway, with kinds, always answered in OpenAI's error JSON shape:
`{"error": {"message", "type", "param", "code"}}`; 429 and 503 also carry `Retry-After`."""

from __future__ import annotations

import json

from starlette.responses import Response


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, tier: str | None = None) -> Response:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after_s)))
        if tier:
            headers["X-Nitsum-Tier"] = tier
        return Response(json.dumps(self.body()), status_code=self.status, headers=headers,
                        media_type="application/json")

    def sse(self) -> bytes:
        """The same error as an SSE event, for failures after a stream has started."""
        return f"data: {json.dumps(self.body())}\n\n".encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def unsupported(param: str, message: str) -> ApiError:
    """A parameter OpenAI defines that this server cannot honour: refused, never silently ignored."""
    return ApiError(400, message, "invalid_request_error", param, "unsupported_parameter")


def too_large(limit_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the {limit_bytes} bytes this server accepts; "
                    "send a shorter prompt", "invalid_request_error", None, "request_too_large")


def client_closed() -> ApiError:
    """The client went away before sending its whole body: nobody reads this answer (nginx's 499)."""
    return ApiError(499, "the client closed the connection before sending the whole request body",
                    "invalid_request_error", None, "client_closed_request")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "invalid_request_error", None, "invalid_api_key")


def forbidden(message: str) -> ApiError:
    return ApiError(403, message, "permission_error", None, "tier_not_allowed")


def not_found(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(404, message, "invalid_request_error", param, code)


def overloaded(message: str, retry_after_s: float) -> ApiError:
    return ApiError(429, message, "rate_limit_error", None, "tier_queue_full", retry_after_s)


def unavailable(message: str, retry_after_s: float) -> ApiError:
    return ApiError(503, message, "service_unavailable", None, "no_group_ready", retry_after_s)


def timeout(message: str) -> ApiError:
    return ApiError(504, message, "timeout", None, "timeout")


def internal(request_id: str) -> ApiError:
    return ApiError(500, f"internal error while serving request {request_id}; it has been logged",
                    "server_error", None, "internal_error")


def outcome_of(status: int) -> str:
    """The `outcome` label of nitsum_requests_total for an answer with this HTTP status."""
    if status >= 500:
        return "unavailable" if status == 503 else "error"
    return {401: "unauthorized", 403: "forbidden", 429: "shed", 499: "cancelled"}.get(status, "bad_request")
