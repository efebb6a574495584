"""What a request body may be before the gateway spends work on it: its size, its nesting, its text.

A body is read with its size counted as it arrives (413 past `GatewayConfig.max_body_bytes`, at
once when Content-Length already says so), must be UTF-8, is scanned for nesting depth on its raw
bytes before `json.loads` (whose recursion a deep document would exhaust), and once parsed holds no
lone surrogate (which the tokenizer cannot encode). Also the integer ranges of the wire format
(services/rpc/nitsum.proto), so every number the gateway accepts fits the field it is sent in.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from starlette.requests import ClientDisconnect, Request

from .errors import bad_request, client_closed, too_large

MAX_JSON_DEPTH = 64  # a real request nests 4 deep (body > messages > message > content part)
UINT32_MAX = (1 << 32) - 1  # max_tokens, prompt token ids
INT32_MAX = (1 << 31) - 1  # top_k
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1  # seed

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes included
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
# After json.loads, a lone surrogate can only come from a \uD800-\uDFFF escape.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it is known to pass `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect as e:
        raise client_closed() from e
    return b"".join(chunks)


def nesting_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in JSON text, without parsing it (and without recursion).

    Strings are cut out first so brackets inside them do not count. On text that is not JSON the
    answer may be too high, never too low where a parser would go deeper, which is what matters.
    """
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def decode_json_text(raw: bytes) -> str:
    """The body as text, or 400: JSON between systems is UTF-8 (RFC 8259), and nests at most
    MAX_JSON_DEPTH deep."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 ({e.reason} at byte {e.start})",
                          code="invalid_json") from e
    depth = nesting_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise bad_request(f"request body nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted",
                          code="invalid_json")
    return text


def check_unicode(text: str, doc: Any) -> None:
    """400 naming the first field whose text holds a lone surrogate (an unpaired \\uD800-\\uDFFF
    escape): it is not a Unicode character, and no tokenizer can encode it."""
    if not _SURROGATE_ESCAPE.search(text):
        return
    for path, value in _strings(doc):
        if _SURROGATE.search(value):
            raise bad_request(f"{path or 'the body'}: the text is not valid Unicode (it holds a lone "
                              "surrogate, an unpaired \\ud800-\\udfff escape)", path or None)


def _strings(doc: Any) -> Iterator[tuple[str, str]]:
    """(dotted path, string) for every string value, and (its object's path, key) for every key;
    depth-first, without recursion."""
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            yield path, value
        elif isinstance(value, dict):
            for k, v in reversed(value.items()):
                yield path, k
                stack.append((f"{path}.{k}" if path else k, v))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", v) for i, v in reversed(list(enumerate(value))))
