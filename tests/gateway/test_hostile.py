"""A hostile or careless client gets a 4xx in OpenAI's shape that says what to fix, never a 5xx:
non-finite and out-of-range numbers, loose types, lone surrogates, deep or huge bodies, and
OpenAI fields this server does not do.

Without groups registered the gateway answers 503 once a request is valid and authorized: a 503
here means "got past validation".
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from services.config import TierPolicy
from services.gateway import limits
from services.gateway.errors import ApiError
from services.gateway.limits import nesting_depth, read_body

BODY = {"model": "tiny", "prompt": "hi"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
JSON = {"content-type": "application/json"}


def _error(r: Any, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err  # type: ignore[no-any-return]


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_floats_are_400(gateway, field: str, literal: str) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    raw = f'{{"model": "tiny", "prompt": "hi", "{field}": {literal}}}'.encode()
    _error(client.post("/v1/completions", content=raw, headers=JSON), 400, field)


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/completions", {"prompt": [2 ** 40]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2 ** 32]]}, "prompt"),
    ("/v1/completions", {"prompt": [-1]}, "prompt"),
    ("/v1/completions", {"seed": 2 ** 70}, "seed"),
    ("/v1/completions", {"seed": -(2 ** 64)}, "seed"),
    ("/v1/completions", {"top_k": 2 ** 40}, "top_k"),
    ("/v1/completions", {"max_tokens": 2 ** 40}, "max_tokens"),
    ("/v1/chat/completions", {"max_completion_tokens": 2 ** 33}, "max_completion_tokens"),
])
def test_integers_past_their_wire_field_are_400(gateway, path: str, extra: dict, param: str) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    base = CHAT if "chat" in path else BODY
    _error(client.post(path, json={**base, **extra}), 400, param, "invalid_value")


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "16"), ("max_tokens", True), ("max_tokens", 16.0), ("stream", "yes"), ("stream", 1),
    ("temperature", "1"), ("temperature", True), ("logprobs", -3), ("seed", "7"), ("top_k", 2.0),
    ("ignore_eos", "true"), ("n", "1"),
])
def test_loose_types_are_400(gateway, field: str, value: object) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    _error(client.post("/v1/completions", json={**BODY, field: value}), 400, field, "invalid_value")


def test_nested_loose_types_name_the_field(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    _error(client.post("/v1/chat/completions", json={**CHAT, "stream_options": {"include_usage": "yes"}}), 400,
           "stream_options.include_usage")
    for prompt in ([1.5], [], ["a", "b"], [[1], [2]], [True]):
        err = _error(client.post("/v1/completions", json={**BODY, "prompt": prompt}), 400, "prompt")
        assert "list of token ids" in err["message"], prompt
    for stop in (["a"] * 5, "", [""], 3):
        _error(client.post("/v1/completions", json={**BODY, "stop": stop}), 400, "stop")
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    err = _error(client.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": image}]}),
                 400, "messages.0.content")
    assert "only text" in err["message"]
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]
    assert client.post("/v1/chat/completions",
                       json={**CHAT, "messages": [{"role": "user", "content": parts}]}).status_code == 503


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ["\\udfff"]}', "prompt.0"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": '
                             b'[{"type": "text", "text": "x\\uDC00"}]}]}', "messages.0.content.0.text"),
])
def test_lone_surrogates_are_400(gateway, path: str, raw: bytes, param: str) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    err = _error(client.post(path, content=raw, headers=JSON), 400, param)
    assert "not valid Unicode" in err["message"]


def test_paired_surrogates_and_non_utf8(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    emoji = b'{"model": "tiny", "prompt": "\\ud83d\\ude00"}'  # a pair: one real character
    assert client.post("/v1/completions", content=emoji, headers=JSON).status_code == 503
    encoded_surrogate = b'{"model": "tiny", "prompt": "\xed\xa0\x80"}'
    err = _error(client.post("/v1/completions", content=encoded_surrogate, headers=JSON), 400, code="invalid_json")
    assert "UTF-8" in err["message"]


def test_deep_json_is_refused_and_only_after_the_key(make_gateway, keys_doc) -> None:  # type: ignore[no-untyped-def]
    client, _ = make_gateway(keys_doc)
    deep = b"[" * 100_000 + b"]" * 100_000
    _error(client.post("/v1/completions", content=deep, headers=JSON), 401, code="invalid_api_key")
    err = _error(client.post("/v1/completions", content=deep, headers={**JSON, "Authorization": "Bearer sk-all"}),
                 400, code="invalid_json")
    assert str(limits.MAX_JSON_DEPTH) in err["message"]
    # nesting inside a field counts too, and a value that merely looks deep does not
    tower = b'{"model": "tiny", "prompt": "hi", "metadata": ' + b'{"a": ' * 70 + b"1" + b"}" * 71
    _error(client.post("/v1/completions", content=tower, headers={**JSON, "Authorization": "Bearer sk-all"}),
           400, code="invalid_json")
    looks_deep = {"model": "tiny", "prompt": "[{" * 1000}
    assert client.post("/v1/completions", json=looks_deep, headers={"Authorization": "Bearer sk-all"}).status_code == 503


def test_nesting_depth_skips_strings() -> None:
    assert nesting_depth(b'{"a": [1, {"b": "[[[["}]}') == 3
    assert nesting_depth(b'["\\"[[[", ["\\\\"], "]"]') == 2
    assert nesting_depth(b"[]" * 10_000) == 1
    assert nesting_depth(b'"no structure"') == 0


def test_body_over_the_limit_is_413(make_gateway) -> None:  # type: ignore[no-untyped-def]
    client, _ = make_gateway(max_body_bytes=4096)
    big = {**BODY, "prompt": "x" * 5000}
    err = _error(client.post("/v1/completions", json=big), 413, code="request_too_large")
    assert "4096" in err["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    _error(client.post("/v1/completions", content=chunks(), headers=JSON), 413, code="request_too_large")
    assert client.post("/v1/completions", json={**BODY, "prompt": "x" * 3000}).status_code == 503


UNSUPPORTED = [
    ("response_format", {"type": "json_object"}), ("response_format", {"type": "json_schema", "json_schema": {}}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("parallel_tool_calls", True),
    ("logprobs", True), ("top_logprobs", 3), ("logit_bias", {"50256": -100}), ("audio", {"voice": "x"}),
    ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}),
    ("presence_penalty", 0.5), ("frequency_penalty", -1), ("presence_penalty", True),
]


@pytest.mark.parametrize("field, value", UNSUPPORTED)
def test_unsupported_chat_fields_are_400_by_name(gateway, field: str, value: object) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    err = _error(client.post("/v1/chat/completions", json={**CHAT, field: value}), 400, field, "unsupported_parameter")
    assert "not supported" in err["message"]


@pytest.mark.parametrize("field, value", [("echo", True), ("logprobs", 2), ("best_of", 3), ("suffix", "end"),
                                          ("logit_bias", {"1": 5}), ("n", 2)])
def test_unsupported_completion_fields_are_400_by_name(gateway, field: str, value: object) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    err = _error(client.post("/v1/completions", json={**BODY, field: value}), 400, field)
    assert "not supported" in err["message"]


def test_harmless_and_unknown_fields_are_accepted(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    chat = {**CHAT, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
            "parallel_tool_calls": False, "logprobs": False, "top_logprobs": 0, "logit_bias": {},
            "presence_penalty": 0, "frequency_penalty": 0.0, "modalities": ["text"], "user": "u", "store": False,
            "metadata": {"k": "v"}, "stream_options": {"include_usage": True}, "service_tier": "auto",
            "max_completion_tokens": 5, "n": 1, "seed": None, "temperature": None, "some_extension": [1, 2]}
    assert client.post("/v1/chat/completions", json=chat).status_code == 503, "valid: waits for the mesh"
    completion = {**BODY, "echo": False, "logprobs": 0, "best_of": 1, "suffix": None, "max_tokens": 3}
    assert client.post("/v1/completions", json=completion).status_code == 503


def test_api_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = TierPolicy.model_validate({"api_keys": {"sk-a": {"tiers": ["batch"]}, "sk-b": {"tiers": ["standard"]},
                                                     "sk-c": {"tiers": ["interactive"]}}})
    import services.config as config_module

    calls: list[int] = []
    real = config_module.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(a) + len(b))
        return real(a, b)

    monkeypatch.setattr(config_module.hmac, "compare_digest", counting)
    assert policy.grant_for("sk-a") == policy.api_keys["sk-a"]
    assert policy.grant_for("sk-c") == policy.api_keys["sk-c"]
    assert policy.grant_for("sk-") is None and policy.grant_for("x" * 500) is None
    # every key, every time, on inputs of one length: neither which key matched nor a guess's length shows
    assert len(calls) == 4 * 3 and len(set(calls)) == 1


def test_echoed_values_are_cut_short(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _ = gateway
    r = client.post("/v1/completions", json={**BODY, "model": "m" * 100_000})
    _error(r, 404, "model", "model_not_found")
    assert len(r.content) < 1000
    r = client.post("/v1/completions", json={**BODY, "service_tier": "s" * 100_000})
    _error(r, 400, "service_tier", "unknown_tier")
    assert len(r.content) < 1000


def test_a_client_gone_mid_body_is_499_not_500() -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive)
    with pytest.raises(ApiError) as e:
        asyncio.run(read_body(request, 1024))
    assert e.value.status == 499
