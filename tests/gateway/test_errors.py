"""Every error the gateway answers has OpenAI's shape and the status a client can act on."""

from __future__ import annotations

from typing import Any

from services.gateway.protocol import CompletionRequest


def _shape(r: Any, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and isinstance(err["message"], str)
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    assert "Traceback" not in r.text
    return err  # type: ignore[no-any-return]


def test_malformed_json(gateway) -> None:  # type: ignore[no-untyped-def]
    client, mesh = gateway
    mesh.ready()
    r = client.post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"})
    _shape(r, 400, "invalid_json")
    r = client.post("/v1/completions", content=b"[1, 2]")
    _shape(r, 400, "invalid_json")


def test_missing_and_out_of_range_fields(gateway) -> None:  # type: ignore[no-untyped-def]
    client, mesh = gateway
    mesh.ready()
    _shape(client.post("/v1/completions", json={"model": "tiny"}), 400, "missing_required_parameter", "prompt")
    _shape(client.post("/v1/chat/completions", json={"model": "tiny"}), 400, "missing_required_parameter", "messages")
    _shape(client.post("/v1/chat/completions", json={"model": "tiny", "messages": []}), 400, param="messages")
    for field, value in (("temperature", 3.5), ("top_p", 0), ("max_tokens", 0), ("n", 2), ("top_k", -1)):
        err = _shape(client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", field: value}), 400,
                     "invalid_value", field)
        assert field in err["message"]
    _shape(client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
           400, "invalid_value")
    err = _shape(client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user"}]}),
                 400, "invalid_value", "messages.0")
    assert err["message"] == "messages.0: a user message needs 'content'"


def test_unknown_model_is_404(gateway) -> None:  # type: ignore[no-untyped-def]
    client, mesh = gateway
    mesh.ready()
    _shape(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404, "model_not_found", "model")


def test_prompt_too_long_for_the_context(gateway) -> None:  # type: ignore[no-untyped-def]
    client, mesh = gateway
    mesh.ready(max_model_len=64)
    err = _shape(client.post("/v1/completions", json={"model": "tiny", "prompt": "word " * 200}), 400,
                 "context_length_exceeded")
    assert "64" in err["message"]
    _shape(client.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 10, "max_tokens": 60}), 400,
           "context_length_exceeded")


def test_unknown_tier_is_400_and_names_the_tiers(gateway) -> None:  # type: ignore[no-untyped-def]
    client, mesh = gateway
    mesh.ready()
    err = _shape(client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"},
                             headers={"X-Nitsum-Tier": "platinum"}), 400, "unknown_tier")
    assert "interactive" in err["message"]
    _shape(client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "service_tier": "scale"}), 400,
           "unknown_tier", "service_tier")




def test_api_keys_401_and_403(make_gateway, keys_doc) -> None:  # type: ignore[no-untyped-def]
    client, mesh = make_gateway(keys_doc)
    mesh.ready()
    body = {"model": "tiny", "prompt": "hi"}
    _shape(client.post("/v1/completions", json=body), 401, "invalid_api_key")
    _shape(client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-nope"}), 401)
    err = _shape(client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-batch",
                                                                    "X-Nitsum-Tier": "interactive"}), 403)
    assert err["type"] == "permission_error" and "batch" in err["message"]
    _shape(client.post("/v1/completions", json={**body, "service_tier": "priority"},
                       headers={"Authorization": "Bearer sk-batch"}), 403)


def test_503_with_retry_after_while_no_group_is_ready(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
    _shape(r, 503, "no_group_ready")
    assert int(r.headers["Retry-After"]) >= 1
    assert client.get("/health").status_code == 503


def test_a_colocated_group_alone_makes_the_gateway_ready(gateway) -> None:  # type: ignore[no-untyped-def]
    """A colocated group prefills and decodes: with it and a router the mesh serves (`c1` plans)."""
    from services.cluster import GroupRecord

    client, mesh = gateway

    async def register(c) -> None:  # type: ignore[no-untyped-def]
        await c.heartbeat_group(GroupRecord("c0", "colocated", 1, 0, "127.0.0.1:1", max_model_len=512), lease_ms=60_000)
        await c.hold_leader("test-router", 60_000)

    mesh.run(register)
    assert client.get("/health").status_code == 200


def test_429_with_retry_after_when_the_tier_queue_is_full(make_gateway) -> None:  # type: ignore[no-untyped-def]
    # (A request's first token is waited for at least its tier's maximum wait + TTFT target.)
    tiers = {"tiers": [{"name": "standard", "ttft_s": 0.2, "tpot_s": 0.1, "queue_limit": 2, "max_wait_s": 0.1},
                       {"name": "batch", "ttft_s": 0.3, "tpot_s": 0.5, "queue_limit": 100, "max_wait_s": 0.1}]}
    client, mesh = make_gateway(tiers, first_event_timeout_s=0.5)
    mesh.ready()
    # Nobody serves the queue: two requests wait (and time out), the third is refused at once.
    for _ in range(2):
        assert client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"}).status_code == 504
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
    err = _shape(r, 429, "tier_queue_full")
    assert err["type"] == "rate_limit_error" and int(r.headers["Retry-After"]) >= 1
    assert r.headers["X-Nitsum-Tier"] == "standard"
    # another tier is not affected
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": "hi"},
                       headers={"X-Nitsum-Tier": "batch"}).status_code == 504


def test_unknown_route_and_method_keep_the_shape(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    _shape(client.get("/v1/nothing"), 404)
    _shape(client.get("/v1/completions"), 405)


def test_single_element_prompt_lists() -> None:
    assert CompletionRequest(model="m", prompt=["a"]).prompt_value() == "a"
    assert CompletionRequest(model="m", prompt=[[1, 2]]).prompt_value() == [1, 2]
