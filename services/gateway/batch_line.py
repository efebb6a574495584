"""One line of a batch, run the way `_serve` runs an HTTP request: the body parsed by protocol.py,
tokenized and queued (admission.py, `Upstream.submit`), its events read back (`Upstream.events`
through `streaming.RequestRun`) and the answer built by `streaming.collect`; no HTTP to itself.

A line's answer is either final (200, or an error the request itself caused: 4xx, or our 500 after
`MAX_INTERNAL_ERRORS`), which the batch records, or transient (a full tier queue or a shed request,
429; no group or router ready, 503; no answer in time, 504), after which the line runs again later:
the batch's load is held back, never failed, by a busy cluster.

Before a line's request is queued its `InFlight` record is written, and again with its queue entry
id once queued, so that a gateway which takes the batch over after a restart finds it: a request
the mesh still knows (queued, dispatched, or with output to read) is read back from its output
stream, whose events are kept from the start; one it does not know any more is cancelled and the
line runs again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.cluster import ClusterClient
from services.cluster.batch_store import InFlight
from services.config import GatewayConfig
from services.metrics import GatewayMetrics
from services.rpc import pb

from .admission import queued_request
from .batch_input import BadLine, BatchLine
from .codec import TextCodec
from .errors import ApiError, bad_request, outcome_of
from .protocol import ChatCompletionRequest, CompletionRequest, ResponseShape, parse_body
from .streaming import RequestRun, collect
from .upstream import Upstream

log = logging.getLogger("nitsum.gateway")
TRANSIENT = (429, 503, 504)
MAX_INTERNAL_ERRORS = 3  # a line that met our own 500 this often is recorded as failed


@dataclass(frozen=True)
class LineResult:
    """An answer for a line (`status`, `body`), or with `retry_after_s` set a reason to run it again later."""

    status: int
    request_id: str
    body: dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_after_s: float | None = None

    @property
    def transient(self) -> bool:
        return self.retry_after_s is not None


def line_id(batch_id: str, index: int) -> str:
    """The output line's `id`: the same however often the line runs."""
    return "batch_req_" + hashlib.blake2b(f"{batch_id}:{index}".encode(), digest_size=12).hexdigest()


def output_line(batch_id: str, line: BatchLine, result: LineResult) -> str:
    return json.dumps({"id": line_id(batch_id, line.index), "custom_id": line.custom_id,
                       "response": {"status_code": result.status, "request_id": result.request_id,
                                    "body": result.body}, "error": None})


def bad_line_output(batch_id: str, bad: BadLine) -> str:
    return json.dumps({"id": line_id(batch_id, bad.index), "custom_id": bad.custom_id, "response": None,
                       "error": {"code": bad.code, "message": bad.message}})


def _refused(e: ApiError, request_id: str) -> LineResult:
    retry = max(1.0, e.retry_after_s or 1.0) if e.status in TRANSIENT else None
    return LineResult(e.status, request_id, e.body(), retry_after_s=retry)


class LineRunner:
    def __init__(self, config: GatewayConfig, codec: TextCodec, metrics: GatewayMetrics, upstream: Upstream,
                 cluster: ClusterClient) -> None:
        self.config = config
        self.codec = codec
        self.metrics = metrics
        self.upstream = upstream
        self.cluster = cluster

    async def run(self, line: BatchLine, chat: bool, tier: str, resume: InFlight | None,
                  in_flight: Callable[[InFlight], Awaitable[None]]) -> LineResult:
        """The line's answer; `resume` is the request a previous runner had in flight for it."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        submitted = False
        try:
            body = parse_body(line.body, ChatCompletionRequest if chat else CompletionRequest)
            if body.stream:
                raise bad_request("stream: a batch's requests are answered whole; leave stream out", "stream",
                                  "unsupported_parameter")
            if resume is not None and await self._still_known(resume):
                log.info("batch line %s: reading back its request %s", line.custom_id[:100], resume.request.request_id)
                queued, entry_id = resume.request, resume.entry_id
            else:
                if resume is not None:
                    log.info("batch line %s: its request %s is gone; running it again", line.custom_id[:100],
                             resume.request.request_id)
                    self.upstream.cancel(resume.request.request_id)
                queued = await queued_request(self.config, self.codec, self.upstream, body, chat, tier, rid)
                await in_flight(InFlight("", queued))
                entry_id = await self.upstream.submit(queued)
                submitted = True
                await in_flight(InFlight(entry_id, queued))
                self.metrics.prompt_tokens.labels(tier).inc(len(queued.prompt_ids))
        except ApiError as e:
            if e.status not in TRANSIENT:
                self.metrics.requests.labels(tier, outcome_of(e.status)).inc()
            return _refused(e, rid)
        except asyncio.CancelledError:
            if submitted:
                self.upstream.cancel(rid)
            raise
        shape = ResponseShape(queued.request_id, self.config.served_model_name, tier, chat,
                              bool(body.return_token_ids))
        return await self._answer(queued, entry_id or "0-0", shape, body.stops)

    async def _answer(self, queued: pb.QueuedRequest, entry_id: str, shape: ResponseShape,
                      stops: tuple[str, ...]) -> LineResult:
        run = RequestRun(self.upstream, self.codec, self.metrics, self.config.policy.tier(queued.tier), queued,
                         entry_id, shape, stops)
        try:
            first = await run.first_event()
        except ApiError as e:
            run.record(outcome_of(e.status))
            return _refused(e, run.request_id)
        except asyncio.CancelledError:  # the batch was cancelled or its gateway stops: free the request
            run.upstream.cancel(run.request_id)
            raise
        response = await collect(run, first, {})
        body = json.loads(bytes(response.body))
        if response.status_code != 200:
            retry = float(response.headers.get("retry-after", "1")) if response.status_code in TRANSIENT else None
            return LineResult(response.status_code, run.request_id, body, retry_after_s=retry)
        usage = body.get("usage") or {}
        return LineResult(200, run.request_id, body, int(usage.get("prompt_tokens", 0)),
                          int(usage.get("completion_tokens", 0)))

    async def _still_known(self, flight: InFlight) -> bool:
        """Whether the mesh still has the request a previous runner queued (then its answer can be read)."""
        rid, tier = flight.request.request_id, flight.request.tier
        if await self.cluster.is_cancelled(rid):  # its gateway stopped and gave it up: nothing will come
            return False
        return ((bool(flight.entry_id) and await self.cluster.queued_entry_exists(tier, flight.entry_id))
                or await self.cluster.is_inflight(rid) or await self.cluster.output_exists(rid))
