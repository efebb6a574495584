"""The gateway stays whole under what goes wrong on its side or costs it time: an internal error
answers a logged 500 and keeps the connection, a huge prompt is tokenized off the event loop,
every outcome is counted, and what it sends the engine is always something the engine can take.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from services.cluster.redis_server import RedisServer
from services.config import GatewayConfig, RedisSettings
from services.gateway import admission
from services.gateway.app import create_app
from tests.gateway.conftest import Mesh

TIERS = ("interactive", "standard", "batch")


def ready(mesh: Mesh, base: Callable[[str], Any]) -> None:
    """Groups registered, a router leading, and the gateway has seen both."""
    mesh.ready()
    mesh.run(lambda c: c.hold_leader("test-router", 60_000))  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while base("/health").status_code != 200:
        assert time.monotonic() < deadline, "the gateway never became ready"
        time.sleep(0.1)


@pytest.fixture
def live(redis_server: RedisServer, tiny_model_dir: Path, codec) -> Iterator[tuple[str, Mesh]]:  # type: ignore[no-untyped-def]
    """The gateway under uvicorn on a real socket (what keep-alive and concurrency need)."""
    prefix = f"gw{uuid.uuid4().hex[:8]}:"
    config = GatewayConfig(model=tiny_model_dir, model_name="tiny", readiness_cache_s=0,
                           redis=RedisSettings(url=redis_server.url, prefix=prefix))
    server = uvicorn.Server(uvicorn.Config(create_app(config, codec), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", Mesh(redis_server.url, prefix)
    server.should_exit = True
    thread.join(10)


def _requests_total(metrics_text: str, tier: str, outcome: str) -> float:
    m = re.search(rf'nitsum_requests_total{{outcome="{outcome}",tier="{tier}"}} (\S+)', metrics_text)
    assert m, metrics_text
    return float(m.group(1))


def test_internal_error_is_a_logged_500_and_the_connection_stays_usable(live, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    url, mesh = live
    ready(mesh, lambda path: httpx.get(url + path))

    def broken(*args: object) -> None:
        raise RuntimeError("a bug in building the sampling parameters")

    monkeypatch.setattr(admission, "sampling", broken)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": "hi"}),
                 headers={"Content-Type": "application/json"})
    first = conn.getresponse()
    body = json.loads(first.read())
    assert first.status == 500 and first.getheader("connection") != "close"
    sock = conn.sock
    conn.request("GET", "/metrics")  # the same connection, still open
    second = conn.getresponse()
    text = second.read().decode()
    assert second.status == 200 and conn.sock is sock
    assert _requests_total(text, "standard", "error") == 1.0
    rid = first.getheader("x-request-id") or "no X-Request-Id"
    assert body["error"]["type"] == "server_error" and rid in body["error"]["message"]
    assert "Traceback" not in json.dumps(body)
    assert any(rid in r.getMessage() and r.exc_info for r in caplog.records), "logged with the request id"


def test_a_huge_prompt_is_tokenized_off_the_event_loop(live, codec, responder, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    url, mesh = live
    ready(mesh, lambda path: httpx.get(url + path))
    in_encode, release = threading.Event(), threading.Event()
    real_encode = codec.encode

    def slow_encode(text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > 100_000:  # the big request: hold its tokenization until the small one is served
            in_encode.set()
            release.wait(30)
        return real_encode(text, add_special_tokens=add_special_tokens)  # type: ignore[no-any-return]

    monkeypatch.setattr(codec, "encode", slow_encode)
    big: dict[str, httpx.Response] = {}
    with responder(mesh, TIERS, codec.encode("ok", add_special_tokens=False)):
        sender = threading.Thread(target=lambda: big.setdefault("r", httpx.post(
            f"{url}/v1/completions", json={"model": "tiny", "prompt": "word " * 200_000}, timeout=60)))
        sender.start()
        try:
            assert in_encode.wait(20), "the big request never reached tokenization"
            small = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                               timeout=10)
            assert small.status_code == 200, small.text
            assert not release.is_set() and sender.is_alive()  # served while the big one was still in encode
        finally:
            release.set()
            sender.join(60)
    assert big["r"].status_code == 400 and big["r"].json()["error"]["code"] == "context_length_exceeded"


def test_tiny_temperature_is_greedy_and_sampling_gets_a_seed(live, codec, responder) -> None:  # type: ignore[no-untyped-def]
    url, mesh = live
    ready(mesh, lambda path: httpx.get(url + path))
    with responder(mesh, TIERS, codec.encode("ok", add_special_tokens=False)) as answering:
        def send(**extra: object) -> Any:
            r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2, **extra},
                           timeout=10)
            assert r.status_code == 200, r.text
            return answering.seen[-1].sampling

        greedy = send(temperature=1e-40)
        assert greedy.temperature == 0.0 and not greedy.has_seed
        assert not send(temperature=0).has_seed
        sampled = [send(temperature=0.7), send()]  # no seed given: one is drawn, so a resumed request agrees
        assert all(s.has_seed and 0 <= s.seed < 2 ** 63 for s in sampled) and sampled[0].seed != sampled[1].seed
        chosen = send(temperature=0.7, seed=-5, top_p=1e-300)
        assert chosen.has_seed and chosen.seed == -5 and chosen.top_p > 0


def test_prompt_ids_outside_the_vocabulary_are_400(live, codec) -> None:  # type: ignore[no-untyped-def]
    url, mesh = live
    ready(mesh, lambda path: httpx.get(url + path))
    for prompt in ([codec.vocab_size], [[1, 2, codec.vocab_size + 7]]):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2}, timeout=10)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "prompt" and "vocabulary" in err["message"], r.text


def test_every_outcome_is_counted(make_gateway) -> None:  # type: ignore[no-untyped-def]
    client, _ = make_gateway(max_body_bytes=2048)
    client.post("/v1/completions", json={"model": "tiny", "prompt": "x" * 4000})  # 413
    client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "tools": [{"type": "function"}]})  # 400
    client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})  # 503: no group ready
    text = client.get("/metrics").text
    assert _requests_total(text, "standard", "bad_request") == 2.0
    assert _requests_total(text, "standard", "unavailable") == 1.0


def test_openapi_describes_the_post_bodies_and_their_answers(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    doc = client.get("/openapi.json").json()
    for path, required in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")):
        op = doc["paths"][path]["post"]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert required in schema["required"] and "model" in schema["required"]
        assert schema["properties"]["model"]["examples"] == ["tiny"]
        assert {"200", "400", "401", "403", "404", "413", "429", "503"} <= set(op["responses"])
        props = schema["properties"]
        temperature = next(s for s in props["temperature"]["anyOf"] if s["type"] == "number")
        assert temperature["minimum"] == 0 and temperature["maximum"] == 2
        top_k = next(s for s in props["top_k"]["anyOf"] if s["type"] == "integer")
        assert top_k["maximum"] == 2 ** 31 - 1
    for ref in re.findall(r'"\$ref": "([^"]+)"', json.dumps(doc)):  # every reference resolves
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
    assert "$defs" not in json.dumps(doc["paths"])


def test_token_id_prompts_are_bounded_by_the_models_vocabulary(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The engine's rule: ids below the model's embedding rows, whatever the tokenizer numbers
    (a checkpoint whose tokenizer knows fewer tokens than the model embeds, as `small` does)."""
    import json

    from services.engine.make_model import make_model
    from services.gateway.codec import load_codec

    model = make_model("tiny", tmp_path / "m", "float32", seed=0)
    cfg = json.loads((model / "config.json").read_text())
    cfg["vocab_size"] = 1000  # more rows than the tokenizer's words
    (model / "config.json").write_text(json.dumps(cfg))
    assert load_codec(model).vocab_size == 1000
