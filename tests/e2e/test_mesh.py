"""`nitsum up` with plan p1,d1, driven by the official openai client: what a user sees."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest

from services.launch import Mesh


@pytest.fixture(scope="module")
def mesh(start_mesh: Callable[..., Mesh], e2e_tiers: dict) -> Iterator[Mesh]:
    with start_mesh("p1,d1", e2e_tiers) as m:
        yield m


def _client(mesh: Mesh, key: str = "sk-e2e") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mesh.url}/v1", api_key=key, max_retries=0, timeout=60)


# `nitsum up --plan p1,d1` brings slot 0 and slot 1 into these groups at epoch 1.
PREFILL, DECODE, DECODE_SLOT = "p0-e1", "d1-e1", "slot1"


ROUTERS = ("router0", "router1")  # `nitsum up` runs a leader and a standby


@contextmanager
def paused(mesh: Mesh, *names: str) -> Iterator[None]:
    """SIGSTOP some of the mesh's processes (hung services), SIGCONT them afterwards."""
    pids = [mesh.pid(name) for name in names]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _error(exc: openai.APIStatusError, status: int) -> dict:
    assert exc.status_code == status
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in exc.response.text
    return body["error"]  # type: ignore[no-any-return]


def test_greedy_text_matches_the_engine_streaming_or_not(mesh: Mesh, reference) -> None:  # type: ignore[no-untyped-def]
    client, tok = _client(mesh), reference.tokenizer
    prompt = "Once upon a time"
    want = tok.decode(reference(tok.encode(prompt), 16))
    cli = subprocess.run([sys.executable, "-m", "services.cli", "generate", "--model", str(mesh.config.model),
                          "--prompt", prompt, "--max-tokens", "16", "--json"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout.splitlines()[-1])["text"] == want  # `nitsum generate` agrees with the engine
    raw = client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                                      extra_headers={"X-Nitsum-Tier": "interactive"})
    assert raw.headers["X-Nitsum-Tier"] == "interactive"
    full = raw.parse()
    assert full.choices[0].text == want and full.usage.completion_tokens == 16
    assert full.service_tier == "interactive"
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    want_chat = tok.decode(reference(tok.apply_chat_template(messages), 12))
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,  # type: ignore[arg-type]
                                          service_tier="priority")
    assert chat.choices[0].message.content == want_chat and chat.service_tier == "interactive"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,  # type: ignore[arg-type]
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want_chat
    assert [m.id for m in client.models.list().data] == [mesh.config.model.name]  # type: ignore[union-attr]


def test_16_concurrent_requests_across_two_tiers_all_complete(mesh: Mesh) -> None:
    client = openai.AsyncOpenAI(base_url=f"{mesh.url}/v1", api_key="sk-e2e", max_retries=0, timeout=120)

    async def one(i: int) -> tuple[str, int, str | None]:
        tier = "interactive" if i % 2 else "batch"
        raw = await client.completions.with_raw_response.create(
            model="tiny", prompt=f"request number {i}", max_tokens=24, temperature=0.8, seed=i,
            extra_headers={"X-Nitsum-Tier": tier}, extra_body={"ignore_eos": True})
        body = raw.parse()
        return raw.headers["X-Nitsum-Tier"], body.usage.completion_tokens, body.choices[0].finish_reason

    async def all_of_them() -> list[tuple[str, int, str | None]]:
        try:
            return await asyncio.gather(*(one(i) for i in range(16)))
        finally:
            await client.close()

    results = asyncio.run(all_of_them())
    assert sorted(r[0] for r in results) == ["batch"] * 8 + ["interactive"] * 8
    assert all(r[1] == 24 and r[2] == "length" for r in results)
    metrics = httpx.get(f"{mesh.url}/metrics").text
    for tier in ("interactive", "batch"):
        count = next(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith(f'nitsum_ttft_seconds_count{{tier="{tier}"}}'))
        assert count >= 8


def test_client_error_cases_status_and_shape(mesh: Mesh) -> None:
    client = _client(mesh)
    r = httpx.post(f"{mesh.url}/v1/completions", content=b"{not json", headers={"Authorization": "Bearer sk-e2e"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{mesh.url}/v1/chat/completions", json={"model": "tiny"}, headers={"Authorization": "Bearer sk-e2e"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", temperature=9)
    assert _error(e.value, 400)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", extra_headers={"X-Nitsum-Tier": "gold"})
    assert _error(e.value, 400)["code"] == "unknown_tier"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="many words " * 300, max_tokens=4)
    assert _error(e.value, 400)["code"] == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError) as e:
        _client(mesh, "sk-wrong").completions.create(model="tiny", prompt="hi")
    _error(e.value, 401)
    with pytest.raises(openai.PermissionDeniedError) as e:
        _client(mesh, "sk-batch").completions.create(model="tiny", prompt="hi", extra_headers={"X-Nitsum-Tier": "interactive"})
    _error(e.value, 403)
    ok = _client(mesh, "sk-batch").completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert ok.service_tier == "batch"


def test_429_while_the_tier_queue_is_full(mesh: Mesh) -> None:
    client = _client(mesh)
    async def waiting_request() -> str:
        async with openai.AsyncOpenAI(base_url=f"{mesh.url}/v1", api_key="sk-e2e", max_retries=0) as c:
            r = await c.completions.create(model="tiny", prompt="first", max_tokens=3,
                                           extra_headers={"X-Nitsum-Tier": "scarce"})
            return r.choices[0].finish_reason or ""

    async def scenario() -> str:
        with paused(mesh, *ROUTERS):  # nobody takes from the queue: the first request waits in it
            first = asyncio.ensure_future(waiting_request())
            await asyncio.sleep(0.5)
            with pytest.raises(openai.RateLimitError) as e:
                await asyncio.to_thread(client.completions.create, model="tiny", prompt="second", max_tokens=3,
                                        extra_headers={"X-Nitsum-Tier": "scarce"})
            assert _error(e.value, 429)["type"] == "rate_limit_error"
            assert int(e.value.response.headers["Retry-After"]) >= 1
            assert e.value.response.headers["X-Nitsum-Tier"] == "scarce"
        return await asyncio.wait_for(first, 30)  # the router resumes and serves the waiting one

    assert asyncio.run(scenario()) == "length"


def test_while_no_decode_group_is_ready_health_says_so_and_requests_wait(mesh: Mesh) -> None:
    """A decode group that stops (its lease expires) is reported by /health at once; requests
    meanwhile wait in their queue (the group may be restarting) and are served once it is back."""
    client = _client(mesh)
    with paused(mesh, DECODE_SLOT):  # its heartbeats stop; the lease (3 s) expires
        deadline = time.monotonic() + 10
        while httpx.get(f"{mesh.url}/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        health = httpx.get(f"{mesh.url}/health")
        assert health.status_code == 503 and health.json()["missing"] == ["decode"]
        waiting = ThreadPoolExecutor(1).submit(client.completions.create, model="tiny", prompt="hi", max_tokens=2)
        time.sleep(1.0)
        assert not waiting.done()
    assert waiting.result(timeout=30).usage.completion_tokens == 2
    deadline = time.monotonic() + 10
    while httpx.get(f"{mesh.url}/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(f"{mesh.url}/health").status_code == 200


def test_a_decode_group_hanging_mid_stream_loses_no_token(mesh: Mesh, reference) -> None:  # type: ignore[no-untyped-def]
    """Tokens are streaming from the only decode group when it hangs: its lease expires, the router
    resumes the request from the tokens the client has, and once a decode group is back the stream
    goes on; the text equals an unfaulted run's, with no token repeated or lost."""
    client, tok = _client(mesh), reference.tokenizer
    prompt = "hello"
    want = tok.decode(reference(tok.encode(prompt), 120))
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=120, stream=True, temperature=0,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    got = [next(chunks).choices[0].text for _ in range(5)]  # the first from prefill, the rest from decode
    with paused(mesh, DECODE_SLOT):
        time.sleep(4.5)  # past its lease: the request is taken back and waits for a decode group
    got += [c.choices[0].text for c in chunks if c.choices]
    assert "".join(got) == want


def _group_address(mesh: Mesh, group_id: str) -> str:
    import redis
    r = redis.Redis.from_url(mesh.redis_url, decode_responses=True)
    try:
        return str(r.hget(f"{mesh.config.redis_prefix}group:{group_id}", "address"))
    finally:
        r.close()


def test_a_second_dispatch_of_a_request_is_dropped(mesh: Mesh) -> None:
    """A router that dies mid-dispatch leaves its entry to be dispatched again: the prefill group
    must not run (and stream) the request a second time."""
    import grpc

    from services.rpc import pb, pb_grpc

    reply = _client(mesh).completions.create(model="tiny", prompt="once", max_tokens=3)
    assert reply.usage.completion_tokens == 3
    again = pb.PrefillRequest(request=pb.QueuedRequest(request_id=reply.id, tier="standard", prompt_ids=[1, 2, 3],
                                                       sampling=pb.SamplingParams(max_tokens=3, top_p=1.0)),
                              decode_group=DECODE, decode_address=_group_address(mesh, DECODE))
    with grpc.insecure_channel(_group_address(mesh, PREFILL)) as channel:
        answer = pb_grpc.PrefillStub(channel).Prefill(again, timeout=30)
    assert answer.error.kind == pb.CANCELLED and "duplicate" in answer.error.message


def _decode_group(mesh: Mesh) -> dict[str, float]:
    import redis
    r = redis.Redis.from_url(mesh.redis_url, decode_responses=True)
    try:
        raw = r.hgetall(f"{mesh.config.redis_prefix}group:{DECODE}")
    finally:
        r.close()
    return {k: float(v) for k, v in raw.items() if k in ("running", "used_kv_blocks", "aborted")}


def test_client_leaving_mid_stream_frees_kv_blocks(mesh: Mesh) -> None:
    before = _decode_group(mesh)
    body = {"model": "tiny", "prompt": "keep going", "max_tokens": 480, "stream": True, "ignore_eos": True}
    headers = {"Authorization": "Bearer sk-e2e"}
    with httpx.stream("POST", f"{mesh.url}/v1/completions", json=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
    # the client is gone; the decode group aborts the request and frees its blocks
    deadline = time.monotonic() + 10
    state = _decode_group(mesh)
    while time.monotonic() < deadline and not (state["aborted"] > before["aborted"] and state["used_kv_blocks"] == 0):
        time.sleep(0.2)
        state = _decode_group(mesh)
    assert state["aborted"] == before["aborted"] + 1
    assert state["used_kv_blocks"] == 0 and state["running"] == 0
    metrics = httpx.get(f"{mesh.url}/metrics").text
    assert 'nitsum_requests_total{outcome="cancelled",tier="standard"} 1.0' in metrics


def test_client_leaving_while_queued_drops_the_request(mesh: Mesh) -> None:
    def cancelled() -> float:
        text = httpx.get(f"{mesh.url}/metrics").text
        return next(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith('nitsum_requests_total{outcome="cancelled",tier="batch"}'))

    before = cancelled()
    with paused(mesh, *ROUTERS):
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while its request is queued
            httpx.post(f"{mesh.url}/v1/completions", json={"model": "tiny", "prompt": "never mind", "max_tokens": 4},
                       headers={"Authorization": "Bearer sk-e2e", "X-Nitsum-Tier": "batch"}, timeout=1.0)
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    depth = -1.0
    while time.monotonic() < deadline:
        text = httpx.get(f"{mesh.url}/metrics").text
        depth = next(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith('nitsum_queue_depth{tier="batch"}'))
        if depth == 0 and cancelled() == before + 1:
            break
        time.sleep(0.2)
    assert depth == 0 and cancelled() == before + 1


def test_metrics_show_per_tier_and_per_group_series(mesh: Mesh) -> None:
    _client(mesh).completions.create(model="tiny", prompt="hi", max_tokens=4, extra_headers={"X-Nitsum-Tier": "batch"})
    text = httpx.get(f"{mesh.url}/metrics").text
    for tier in ("interactive", "standard", "batch"):
        for series in ("nitsum_ttft_seconds_bucket", "nitsum_tpot_seconds_count", "nitsum_queue_depth",
                       "nitsum_goodput_requests_total", "nitsum_requests_total"):
            assert f'tier="{tier}"' in text and series in text
    assert 'nitsum_requests_total{outcome="ok",tier="batch"}' in text
    for group, role in ((PREFILL, "prefill"), (DECODE, "decode")):
        assert f'nitsum_group_tp_degree{{group="{group}",role="{role}"}} 1.0' in text
        assert f'nitsum_group_kv_blocks_free{{group="{group}",role="{role}"}}' in text
