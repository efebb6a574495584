"""One request's tokens on their way to the client: whole (non-streaming) or as SSE chunks.

`RequestRun` reads the request's events, detokenizes them, times them (TTFT, TPOT) and records
the outcome once. A stream that ends early (client gone, stop string) cancels the request
upstream so the decode group frees its KV blocks and batch slot.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from functools import partial

import anyio
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from services.metrics import GatewayMetrics
from services.rpc import pb
from services.tiers import Tier

from .codec import TextCodec
from .errors import ApiError, internal, outcome_of
from .protocol import DONE, ResponseShape
from .textstream import TextAssembler
from .upstream import Upstream

log = logging.getLogger("nitsum.gateway")


class RequestRun:
    def __init__(self, upstream: Upstream, codec: TextCodec, metrics: GatewayMetrics, tier: Tier,
                 queued: pb.QueuedRequest, entry_id: str, shape: ResponseShape, stops: tuple[str, ...]) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.tier = tier
        self.queued = queued
        self.shape = shape
        self.assembler = TextAssembler(partial(codec.decode, skip_special_tokens=True), stops)
        self._events = upstream.events(queued, entry_id)
        self.first_at: float | None = None
        self.last_at = 0.0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._recorded = False

    @property
    def request_id(self) -> str:
        return self.queued.request_id

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    async def first_event(self) -> pb.TokenEvent:
        event = await anext(self._events)
        self._note(event)
        return event

    async def next_event(self) -> pb.TokenEvent | None:
        if self.done:
            return None
        try:
            event = await anext(self._events)
        except StopAsyncIteration:
            return None
        self._note(event)
        return event

    def _note(self, event: pb.TokenEvent) -> None:
        now = time.time()
        if event.token_ids:
            self.first_at = self.first_at or now
            self.last_at = now
            self.completion_tokens += len(event.token_ids)
        if event.finish_reason:
            self.finish_reason = event.finish_reason

    def text_of(self, event: pb.TokenEvent, now: bool = True) -> str:
        """The text this event makes final; with `now` False and no stop string to watch for,
        the ids are only kept, to be decoded once at the end (a whole answer needs no pieces)."""
        if not now and not self.assembler.watching:
            self.assembler.keep(event.token_ids)
            return ""
        text = self.assembler.add(event.token_ids)
        if self.assembler.stopped and not self.done:
            self.finish_reason = "stop"
            self.upstream.cancel(self.request_id)  # a stop string ended it; free the decode slot
        return text

    def record(self, outcome: str) -> None:
        if self._recorded:
            return
        self._recorded = True
        m, tier = self.metrics, self.tier.name
        m.requests.labels(tier, outcome).inc()
        prompt = len(self.queued.prompt_ids)
        if outcome != "ok" or self.first_at is None:
            self.upstream.observed.finish(tier, outcome, prompt, self.completion_tokens)
            return
        ttft = self.first_at - self.queued.arrival_s
        tpot = (self.last_at - self.first_at) / (self.completion_tokens - 1) if self.completion_tokens > 1 else 0.0
        self.upstream.observed.finish(tier, outcome, prompt, self.completion_tokens, ttft, tpot,
                                      self.tier.met(ttft, tpot))
        m.ttft.labels(tier).observe(ttft)
        if self.completion_tokens > 1:
            m.tpot.labels(tier).observe(tpot)
        m.generated_tokens.labels(tier).inc(self.completion_tokens)
        if self.tier.met(ttft, tpot):
            m.goodput.labels(tier).inc()


async def collect(run: RequestRun, first: pb.TokenEvent, headers: dict[str, str]) -> Response:
    pieces = [run.text_of(first, now=False)]
    try:
        while not run.done:
            event = await run.next_event()
            if event is None:
                break
            pieces.append(run.text_of(event, now=False))
    except ApiError as e:
        run.record(outcome_of(e.status))
        return e.response(run.tier.name)
    except Exception:
        log.exception("request %s failed", run.request_id)
        run.record("error")
        return internal(run.request_id).response(run.tier.name)
    finally:
        if not run.done:  # cancelled (client gone) or failed: free the request upstream
            run.upstream.cancel(run.request_id)
    pieces.append(run.assembler.finish())
    run.upstream.forget(run.request_id)
    run.record("ok")
    body = run.shape.full("".join(pieces), run.finish_reason or "stop", len(run.queued.prompt_ids),
                          run.completion_tokens, run.assembler.ids)
    return Response(json.dumps(body), media_type="application/json", headers=headers)


async def _sse_events(run: RequestRun, first: pb.TokenEvent, include_usage: bool) -> AsyncIterator[bytes]:
    finished = False
    try:
        yield run.shape.chunk(run.text_of(first), first=True, ids=list(first.token_ids))
        while not run.done:
            event = await run.next_event()
            if event is None:
                break
            # one chunk per token event, even when its text is held back or empty, so clients
            # can time tokens (TPOT) from the stream
            yield run.shape.chunk(run.text_of(event), ids=list(event.token_ids))
        yield run.shape.chunk(run.assembler.finish(), finish_reason=run.finish_reason or "stop")
        if include_usage:
            yield run.shape.usage_chunk(len(run.queued.prompt_ids), run.completion_tokens)
        yield DONE
        finished = True
        run.record("ok")
    except ApiError as e:
        finished = True
        run.record(outcome_of(e.status))
        yield e.sse()
        yield DONE
    except Exception:  # our fault, mid-stream: the client still gets an error event, not a cut stream
        log.exception("request %s failed mid-stream", run.request_id)
        finished = True
        run.record("error")
        yield internal(run.request_id).sse()
        yield DONE
    finally:
        if finished:
            run.upstream.forget(run.request_id)
        else:
            log.info("client left request %s mid-stream; cancelling it", run.request_id)
            run.record("cancelled")
            run.upstream.cancel(run.request_id)


class _DisconnectAwareStream(StreamingResponse):
    """Streams while watching for the client to leave, whatever the server's ASGI version, and
    always closes the body iterator so its cleanup (cancelling upstream) runs."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


def sse_response(run: RequestRun, first: pb.TokenEvent, include_usage: bool, headers: dict[str, str]) -> Response:
    return _DisconnectAwareStream(_sse_events(run, first, include_usage), media_type="text/event-stream",
                                  headers={**headers, "Cache-Control": "no-cache"})


