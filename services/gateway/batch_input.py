"""A batch's input file, line by line (pure: bytes in, lines out).

Each line that is not blank is one request, `{"custom_id", "method": "POST", "url", "body"}`, with
`url` the batch's endpoint. A line that is not such an object (malformed JSON, no or a repeated
`custom_id`, another method or url, no body, over the gateway's body limit) is a `BadLine`: it goes
to the batch's error file and counts as failed; the others run. A line's `index` is its place
among the file's requests, so reading the same file again gives the same indices (a resumed batch
relies on it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .limits import MAX_JSON_DEPTH, nesting_depth

ENDPOINTS = {"/v1/chat/completions": True, "/v1/completions": False}  # endpoint -> chat


@dataclass(frozen=True)
class BatchLine:
    index: int  # the request's place among the file's requests, from 0
    line: int  # its line number in the file, from 1
    custom_id: str
    body: bytes  # the request body, JSON


@dataclass(frozen=True)
class BadLine:
    index: int
    line: int
    custom_id: str | None
    code: str
    message: str


def read_input(content: bytes, endpoint: str, max_line_bytes: int) -> list[BatchLine | BadLine]:
    """Every request of the file, in order, checked against the batch's endpoint."""
    out: list[BatchLine | BadLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if raw.strip():
            out.append(_check(len(out), number, raw, endpoint, max_line_bytes, seen))
    return out


def _check(index: int, number: int, raw: bytes, endpoint: str, max_line_bytes: int,
           seen: set[str]) -> BatchLine | BadLine:
    def bad(code: str, message: str, custom_id: str | None = None) -> BadLine:
        return BadLine(index, number, custom_id, code, f"line {number}: {message}")

    if len(raw) > max_line_bytes:
        return bad("line_too_large", f"{len(raw)} bytes; a request takes at most {max_line_bytes}")
    doc, error = _json_object(raw)
    if doc is None:
        return bad("invalid_json_line", error)
    custom_id = doc.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad("missing_custom_id", "each request needs a custom_id, a non-empty string")
    if custom_id in seen:
        return bad("duplicate_custom_id", f"custom_id {custom_id[:200]!r} is used by an earlier line", custom_id)
    seen.add(custom_id)
    method = doc.get("method")
    if method != "POST":
        return bad("invalid_method", f"method {str(method)[:20]!r}: batch requests are POST", custom_id)
    url = doc.get("url")
    if url != endpoint:
        known = url in ENDPOINTS
        return bad("invalid_url", f"url {str(url)[:200]!r} is {'not this batch' if known else 'not an'} endpoint"
                   f"{'' if known else ' this server batches'}; this batch's is {endpoint!r}", custom_id)
    body = doc.get("body")
    if not isinstance(body, dict):
        return bad("invalid_body", "body must be the request's JSON object", custom_id)
    return BatchLine(index, number, custom_id, json.dumps(body).encode())


def _json_object(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
    depth = nesting_depth(raw)
    if depth > MAX_JSON_DEPTH + 1:  # the line wraps the body one level deeper than a request's
        return None, f"nests {depth} levels deep; a request nests at most {MAX_JSON_DEPTH}"
    try:
        doc = json.loads(text)
    except ValueError as e:
        return None, f"not valid JSON ({e})"
    if not isinstance(doc, dict):
        return None, "a line is a JSON object with custom_id, method, url and body"
    return doc, ""
