"""The gateway's success path with the test answering for the mesh: tiers, shapes, SSE, metrics."""

from __future__ import annotations

import json


def _events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]


def test_tier_from_header_service_tier_and_key_default(make_gateway, codec, keys_doc, responder) -> None:  # type: ignore[no-untyped-def]
    client, mesh = make_gateway(keys_doc)
    mesh.ready()
    hello = codec.encode("hello there", add_special_tokens=False)
    auth = {"Authorization": "Bearer sk-all"}
    with responder(mesh, ("interactive", "standard", "batch"), hello) as answering:
        cases = [({**auth}, {}, "interactive"),  # the key's default tier
                 ({**auth, "X-Nitsum-Tier": "batch"}, {}, "batch"),
                 ({**auth}, {"service_tier": "flex"}, "batch"),
                 ({**auth}, {"service_tier": "default"}, "standard"),
                 ({**auth, "X-Nitsum-Tier": "standard"}, {"service_tier": "flex"}, "standard")]  # header wins
        for headers, extra, tier in cases:
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 5, **extra},
                            headers=headers)
            assert r.status_code == 200, r.text
            assert r.headers["X-Nitsum-Tier"] == tier
            body = r.json()
            assert body["service_tier"] == tier
            assert body["choices"][0]["text"] == codec.decode(hello)
            assert body["usage"]["completion_tokens"] == len(hello)
            assert answering.seen[-1].tier == tier
            assert answering.seen[-1].sampling.max_tokens == 5


def test_chat_stream_is_openai_sse_with_usage_and_done(gateway, codec, responder) -> None:  # type: ignore[no-untyped-def]
    client, mesh = gateway
    mesh.ready()
    tokens = codec.encode("one two three", add_special_tokens=False)
    with responder(mesh, ("interactive", "standard", "batch"), tokens, finish="stop"):
        r = client.post("/v1/chat/completions", json={"model": "tiny", "stream": True, "max_tokens": 8,
                                                      "messages": [{"role": "user", "content": "count"}]},
                        headers={"X-Nitsum-Tier": "interactive"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["X-Nitsum-Tier"] == "interactive"
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["service_tier"] == "interactive" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == codec.decode(tokens)
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(tokens)


def test_stop_string_truncates_and_cancels_upstream(gateway, codec, responder) -> None:  # type: ignore[no-untyped-def]
    client, mesh = gateway
    mesh.ready()
    tokens = codec.encode("alpha beta gamma delta", add_special_tokens=False)
    with responder(mesh, ("interactive", "standard", "batch"), tokens):
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "stop": "gamma", "max_tokens": 9})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert "gamma" not in body["choices"][0]["text"] and body["choices"][0]["text"].startswith("alpha")


def test_models_and_metrics_show_every_tier(gateway) -> None:  # type: ignore[no-untyped-def]
    client, mesh = gateway
    mesh.ready()
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/health").json()["ready"] is True
    text = client.get("/metrics").text
    for tier in ("interactive", "standard", "batch"):
        assert f'nitsum_ttft_seconds_count{{tier="{tier}"}}' in text
        assert f'nitsum_queue_depth{{tier="{tier}"}}' in text
    assert 'nitsum_group_tp_degree{group="d0",role="decode"} 1.0' in text


def test_return_token_ids_gives_each_chunk_its_ids(gateway, codec, responder) -> None:  # type: ignore[no-untyped-def]
    """vLLM's `return_token_ids`: the ids of the tokens behind the text, streamed or whole (what a
    client counts to see that no token was repeated or lost)."""
    client, mesh = gateway
    mesh.ready()
    tokens = codec.encode("one two three four", add_special_tokens=False)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 9, "return_token_ids": True}
    with responder(mesh, ("interactive", "standard", "batch"), tokens):
        whole = client.post("/v1/completions", json=body).json()
        streamed = client.post("/v1/completions", json={**body, "stream": True})
        plain = client.post("/v1/completions", json={**body, "return_token_ids": False}).json()
    assert whole["choices"][0]["token_ids"] == tokens
    chunks = [json.loads(e) for e in _events(streamed.text)[:-1]]
    assert [i for c in chunks if c["choices"] for i in c["choices"][0]["token_ids"]] == tokens
    assert "token_ids" not in plain["choices"][0]
