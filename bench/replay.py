"""Trace replay against a live gateway: `nitsum bench replay`.

Life of one run: load the trace(s) and give every request a tier (the simulator's tier map and
loader, `router.sim.trace`), scale its arrival times and fit its token counts to the served
model's context (`fit_to_context`), then send each request at its arrival time with the official
`openai` client (AsyncOpenAI, streaming `/v1/completions` with the prompt as token ids, so its
length is exact whatever the tokenizer; `max_tokens` and `ignore_eos` so the output has the trace's
length), time its first token and the tokens after it, and judge it against its tier's targets.
Meanwhile a sampler polls the gateway's `/health` (the groups of the plan, with TP degree, role and
epoch) and a progress line on stderr shows per-tier SLO attainment. At the end the gateway's
`/metrics` counters are read again, so the summary can say whether the gateway counted the same
requests. `bench.replay_plots` draws the figures; `bench.replay_cli` is the command line.

Bounds: only loopback URLs, at most `max_requests` requests, arrivals within `duration_s`, at
most `max_concurrency` in flight, and a drain timeout after the last arrival.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai

from router.sim.trace import load_traces
from services.tiers import Tier

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Outcomes, named as the gateway's `nitsum_requests_total{outcome}` names them, plus the client's own.
STATUS_OUTCOMES = {400: "bad_request", 404: "bad_request", 401: "unauthorized", 403: "forbidden", 429: "shed",
                   503: "unavailable"}


@dataclass(frozen=True)
class ReplayConfig:
    """One replay, validated once (see `validate`)."""

    traces: tuple[str, ...]
    url: str
    tiers: tuple[Tier, ...]
    tier_map: str
    out_dir: Path
    rate_scale: float = 1.0
    duration_s: float = 60.0
    max_requests: int = 200
    max_concurrency: int = 64
    start_s: float = 0.0
    token_scale: float = 1.0
    context_len: int = 512
    max_output_tokens: int | None = None  # default: a quarter of the context
    token_ids: tuple[int, int] = (16, 500)
    model: str | None = None
    api_key: str = "none"
    seed: int = 0
    request_timeout_s: float = 120.0
    drain_timeout_s: float = 60.0
    sample_interval_s: float = 1.0

    @property
    def output_cap(self) -> int:
        return self.max_output_tokens or max(1, self.context_len // 4)

    def validate(self) -> None:
        host = urlsplit(self.url).hostname
        if host not in LOOPBACK_HOSTS:
            raise ValueError(f"--url {self.url}: only a gateway on this machine (127.0.0.1) may be replayed against")
        flags = {"rate_scale": "--rate-scale", "duration_s": "--duration", "token_scale": "--token-scale",
                 "request_timeout_s": "--request-timeout", "drain_timeout_s": "--drain-timeout"}
        for name, flag in flags.items():
            if getattr(self, name) <= 0:
                raise ValueError(f"{flag} must be > 0, got {getattr(self, name)}")
        if self.max_requests < 1 or self.max_concurrency < 1:
            raise ValueError("--max-requests and --max-concurrency must be >= 1")
        if self.context_len < 2 or self.output_cap >= self.context_len:
            raise ValueError(f"--context {self.context_len} leaves no room for a prompt and {self.output_cap} output tokens")
        lo, hi = self.token_ids
        if not 0 <= lo < hi:
            raise ValueError(f"--token-ids {lo}:{hi}: need 0 <= LO < HI")


@dataclass(frozen=True)
class ReplayRequest:
    index: int
    arrival_s: float  # since the start of the replay, after rate scaling
    tier: str
    source: str
    trace_prompt_tokens: int
    trace_output_tokens: int
    prompt_tokens: int  # what is sent, after token scaling and clamping
    max_tokens: int


@dataclass
class RequestResult:
    index: int
    tier: str
    source: str
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    trace_prompt_tokens: int
    trace_output_tokens: int
    sent_s: float = 0.0
    outcome: str = "pending"
    status: int | None = None
    request_id: str | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    finished_s: float | None = None
    completion_tokens: int = 0
    met: bool = False
    error: str | None = None
    retry_after: str | None = None  # the Retry-After header of a 429 or 503


def fit_to_context(prompt: int, output: int, token_scale: float, context_len: int, output_cap: int) -> tuple[int, int]:
    """Trace token counts -> (prompt, max_tokens) that fit the model: scale both, cap the output
    at `output_cap`, then cut the prompt so prompt + output <= context_len."""
    out = max(1, min(round(output * token_scale), output_cap, context_len - 1))
    p = max(1, min(round(prompt * token_scale), context_len - out))
    return p, out


def plan_requests(config: ReplayConfig) -> list[ReplayRequest]:
    """The requests this replay sends: the trace from `start_s`, scaled, cut by duration and count."""
    names = {t.name for t in config.tiers}
    loaded = load_traces(list(config.traces), config.tier_map, names, config.seed, config.rate_scale)
    start = config.start_s / config.rate_scale
    out: list[ReplayRequest] = []
    for r in loaded:
        at = r.arrival_s - start
        if at < 0:
            continue
        if at > config.duration_s or len(out) >= config.max_requests:
            break
        p, o = fit_to_context(r.prompt_tokens, r.output_tokens, config.token_scale, config.context_len,
                              config.output_cap)
        out.append(ReplayRequest(len(out), at, r.tier, r.source, r.prompt_tokens, r.output_tokens, p, o))
    return out


def prompt_ids(request: ReplayRequest, seed: int, id_range: tuple[int, int]) -> list[int]:
    """A prompt of exactly `prompt_tokens` token ids; distinct per request so no cache can share them."""
    rng = random.Random(seed * 1_000_003 + request.index)
    return [rng.randrange(*id_range) for _ in range(request.prompt_tokens)]


@dataclass
class Progress:
    """Live per-tier attainment on stderr (a redrawn line on a terminal, a line every 5 s otherwise)."""

    total: int
    tiers: dict[str, Tier]
    results: list[RequestResult] = field(default_factory=list)
    sent: int = 0
    started: float = field(default_factory=time.monotonic)
    _last_line: float = 0.0

    def line(self) -> str:
        done = [r for r in self.results if r.outcome != "pending"]
        width = 24
        filled = int(width * len(done) / max(1, self.total))
        parts = [f"[{'#' * filled}{'.' * (width - filled)}] {len(done)}/{self.total} done, {self.sent} sent"]
        for name in self.tiers:
            mine = [r for r in done if r.tier == name]
            if mine:
                parts.append(f"{name} {100 * sum(r.met for r in mine) / len(mine):.0f}% of {len(mine)}")
        failed = sum(r.outcome not in ("ok", "pending") for r in done)
        parts.append(f"failed {failed}")
        parts.append(f"{time.monotonic() - self.started:.0f}s")
        return " | ".join(parts)

    def show(self, final: bool = False) -> None:
        tty = sys.stderr.isatty()
        now = time.monotonic()
        if tty:
            sys.stderr.write("\r\033[K" + self.line() + ("\n" if final else ""))
        elif final or now - self._last_line >= 5.0:
            sys.stderr.write(self.line() + "\n")
            self._last_line = now
        sys.stderr.flush()


def _outcome_of(exc: BaseException) -> tuple[str, int | None]:
    if isinstance(exc, openai.APIStatusError):
        return STATUS_OUTCOMES.get(exc.status_code, "error"), exc.status_code
    if isinstance(exc, openai.APITimeoutError):
        return "timeout", None
    if isinstance(exc, openai.APIConnectionError):
        return "connection_error", None
    return "error", None


async def send_one(client: openai.AsyncOpenAI, model: str, request: ReplayRequest, result: RequestResult,
                   config: ReplayConfig, tier: Tier, t0: float) -> None:
    """One streaming completion; fills `result` (TTFT from sending, TPOT over the tokens after the first)."""
    sent = time.monotonic()
    result.sent_s = sent - t0
    first_at = last_at = 0.0
    try:
        raw = await client.completions.with_raw_response.create(
            model=model, prompt=prompt_ids(request, config.seed, config.token_ids), max_tokens=request.max_tokens,
            temperature=0.0, stream=True, stream_options={"include_usage": True},
            extra_headers={"X-Nitsum-Tier": request.tier}, extra_body={"ignore_eos": True})
        result.request_id = raw.headers.get("x-request-id")
        stream = raw.parse()
        async for chunk in stream:
            now = time.monotonic()
            if chunk.usage is not None:
                result.completion_tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].finish_reason is None:
                first_at = first_at or now
                last_at = now
    except Exception as e:  # every failure is a result, never a crash of the replay
        result.outcome, result.status = _outcome_of(e)
        if isinstance(e, openai.APIStatusError):
            result.retry_after = e.response.headers.get("retry-after")
        result.error = f"{type(e).__name__}: {e}"[:300]
        result.finished_s = time.monotonic() - t0
        return
    end = time.monotonic()
    result.outcome, result.status, result.finished_s = "ok", 200, end - t0
    result.e2e_s = end - sent
    if first_at:
        result.ttft_s = first_at - sent
        n = result.completion_tokens
        result.tpot_s = (last_at - first_at) / (n - 1) if n > 1 else None  # undefined for one token
        result.met = tier.met(result.ttft_s, result.tpot_s or 0.0)


async def _served_model(client: openai.AsyncOpenAI) -> str:
    models = await client.models.list()
    if not models.data:
        raise RuntimeError("the gateway serves no model (/v1/models is empty)")
    return models.data[0].id


@dataclass
class PlanSampler:
    """Polls the gateway's /health: the groups (id, role, TP degree, epoch) over time."""

    url: str
    interval_s: float
    samples: list[dict[str, Any]] = field(default_factory=list)

    async def run(self, t0: float) -> None:
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:
                try:
                    doc = (await http.get(f"{self.url}/health")).json()
                    self.samples.append({"t_s": time.monotonic() - t0, "ready": bool(doc.get("ready")),
                                         "groups": doc.get("groups", [])})
                except (httpx.HTTPError, ValueError):
                    self.samples.append({"t_s": time.monotonic() - t0, "ready": False, "groups": []})
                await asyncio.sleep(self.interval_s)


async def _ticker(progress: Progress) -> None:
    while True:
        progress.show()
        await asyncio.sleep(0.5)


async def replay(config: ReplayConfig, requests: Sequence[ReplayRequest],
                 on_start: Callable[[str], None] | None = None) -> tuple[list[RequestResult], list[dict[str, Any]], float]:
    """Send `requests` at their arrival times; returns results, plan samples and the wall time."""
    tiers = {t.name: t for t in config.tiers}
    client = openai.AsyncOpenAI(base_url=f"{config.url}/v1", api_key=config.api_key, max_retries=0,
                                timeout=config.request_timeout_s)
    model = config.model or await _served_model(client)
    if on_start:
        on_start(model)
    progress = Progress(len(requests), tiers)
    gate = asyncio.Semaphore(config.max_concurrency)
    t0 = time.monotonic()
    sampler = PlanSampler(config.url, config.sample_interval_s)
    background = {asyncio.create_task(sampler.run(t0)), asyncio.create_task(_ticker(progress))}
    inflight: set[asyncio.Task[None]] = set()

    async def gated(req: ReplayRequest, res: RequestResult) -> None:
        try:
            await send_one(client, model, req, res, config, tiers[req.tier], t0)
        finally:
            gate.release()

    try:
        for req in requests:
            await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.monotonic()))
            await gate.acquire()
            res = RequestResult(req.index, req.tier, req.source, req.arrival_s, req.prompt_tokens, req.max_tokens,
                                req.trace_prompt_tokens, req.trace_output_tokens)
            progress.results.append(res)
            progress.sent += 1
            inflight.add(asyncio.create_task(gated(req, res)))
        if inflight:
            await asyncio.wait(inflight, timeout=config.drain_timeout_s)
    finally:
        for task in [*inflight, *background]:
            task.cancel()
        await asyncio.gather(*inflight, *background, return_exceptions=True)
        await client.close()
        for res in progress.results:
            if res.outcome == "pending":
                res.outcome, res.error = "cancelled", "still running at the drain timeout"
        progress.show(final=True)
    return progress.results, sampler.samples, time.monotonic() - t0
