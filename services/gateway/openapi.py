"""What `/openapi.json` says about the POST routes, which read their body themselves (to check the
API key and the body's size before parsing it): the request models' JSON schemas, self-contained,
and every status a client may get, each with OpenAI's error shape.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from services.config import GatewayConfig

from .codec import TextCodec


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERRORS = {
    400: "the request is invalid or asks for something not supported; `param` names the field to fix",
    401: "no API key, or one this server does not know",
    403: "the API key may not use the tier asked for",
    404: "the model is not served here",
    413: "the request body is too large",
    429: "the tier's queue is full; retry after `Retry-After` seconds",
    500: "our fault; logged with the request id",
    503: "no prefill or decode group is ready; retry after `Retry-After` seconds",
}

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the completion; with `stream: true`, server-sent events of chunks ending in "
                         "`data: [DONE]`",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "text/event-stream": {"schema": {"type": "string"}}}},
    **{status: {"model": ErrorResponse, "description": text} for status, text in _ERRORS.items()},
}


def request_body(model: type[BaseModel], config: GatewayConfig, codec: TextCodec) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model`, its `$defs` inlined, and the limits
    known only at start (the model's name and vocabulary, the service tiers) written in."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    schema = _inline(schema, defs)
    props = schema["properties"]
    props["model"]["examples"] = [config.served_model_name]
    props["service_tier"]["anyOf"] = [{"enum": sorted(config.policy.service_tiers)}, {"type": "null"}]
    if "prompt" in props:
        _cap_token_ids(props["prompt"], codec.vocab_size - 1)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _cap_token_ids(node: Any, largest: int) -> None:
    """Token ids (integers of the prompt) stop at the vocabulary, not at uint32."""
    if isinstance(node, list):
        for v in node:
            _cap_token_ids(v, largest)
    elif isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = largest
        for v in node.values():
            _cap_token_ids(v, largest)


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """`node` with each `{"$ref": "#/$defs/X"}` replaced by X (the request models do not recurse)."""
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref", "")
    if ref.startswith("#/$defs/"):
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return _inline({**copy.deepcopy(defs[ref.removeprefix("#/$defs/")]), **rest}, defs)
    return {k: _inline(v, defs) for k, v in node.items()}
