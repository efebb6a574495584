"""A `multipart/form-data` body (RFC 7578), already read whole and bounded, split into its fields.

The Files API's upload is the one such body the gateway takes; it is read whole anyway (its size
is bounded by the Files API's limit), so its parts are found with `bytes.find` on the boundary
rather than with a streaming parser and a dependency for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

from .errors import bad_request


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None  # set for a file field
    content_type: str
    data: bytes


def _params(header: str) -> tuple[str, dict[str, str]]:
    """`form-data; name="file"; filename="a.jsonl"` -> ("form-data", {"name": ..., "filename": ...})."""
    msg = Message()
    msg["content-type"] = header
    params = msg.get_params() or []
    value = params[0][0] if params else ""
    return value.lower(), {k.lower(): str(v) for k, v in params[1:]}


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data Content-Type, or 400."""
    kind, params = _params(content_type or "")
    if kind != "multipart/form-data" or not params.get("boundary"):
        raise bad_request("upload the file as multipart/form-data with fields 'file' and 'purpose'",
                          code="invalid_content_type")
    return params["boundary"].encode("latin-1")


def parse_form(body: bytes, boundary: bytes) -> list[Part]:
    """The parts of a multipart/form-data body, or 400 when it is not one."""
    delimiter = b"--" + boundary
    if not body.startswith(delimiter):
        raise bad_request("the multipart body does not start with its boundary", code="invalid_multipart")
    parts: list[Part] = []
    pos = len(delimiter)
    while True:
        if body.startswith(b"--", pos):  # the close delimiter
            return parts
        if not body.startswith(b"\r\n", pos):
            raise bad_request("a multipart boundary is not followed by a line break", code="invalid_multipart")
        head_end = body.find(b"\r\n\r\n", pos + 2)
        end = body.find(b"\r\n" + delimiter, pos + 2)
        if head_end < 0 or end < 0 or head_end > end:
            raise bad_request("the multipart body ends before its closing boundary", code="invalid_multipart")
        parts.append(_part(body[pos + 2:head_end], body[head_end + 4:end]))
        pos = end + 2 + len(delimiter)


def _part(head: bytes, data: bytes) -> Part:
    headers: dict[str, str] = {}
    for line in head.decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    kind, params = _params(headers.get("content-disposition", ""))
    if kind != "form-data" or "name" not in params:
        raise bad_request("a multipart part has no Content-Disposition: form-data name", code="invalid_multipart")
    return Part(params["name"], params.get("filename"), headers.get("content-type", "text/plain"), data)
