"""Every plan serves completions and chat, streaming and not, with the engine's greedy text:
p1,d2 (TP 2 decode) and p2,d1 (TP 2 prefill) here; p1,d1 in test_mesh.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import openai
import pytest

from services.launch import Mesh


@pytest.fixture(scope="module", params=["p1,d2", "p2,d1"])
def mesh(request: pytest.FixtureRequest, start_mesh: Callable[..., Mesh]) -> Iterator[Mesh]:
    with start_mesh(request.param) as m:
        yield m


def test_completions_and_chat_match_the_engine(mesh: Mesh, reference) -> None:  # type: ignore[no-untyped-def]
    client = openai.OpenAI(base_url=f"{mesh.url}/v1", api_key="any", max_retries=0)
    tok = reference.tokenizer
    prompt = "The quick brown fox"
    want = tok.decode(reference(tok.encode(prompt), 12))
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert full.choices[0].text == want
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want

    messages = [{"role": "user", "content": "Say something."}]
    want_chat = tok.decode(reference(tok.apply_chat_template(messages), 10))
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert chat.choices[0].message.content == want_chat
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,  # type: ignore[arg-type]
                                            stream=True, service_tier="flex")
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat
    assert all(c.service_tier == "batch" for c in chunks)
