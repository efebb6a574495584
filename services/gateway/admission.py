"""From a validated request body to the `QueuedRequest` the mesh runs: its prompt's tokens, its
token budget within the context, its sampling (with a seed). `_serve` (app.py) does these steps
for an HTTP request; a batch's lines (batch_line.py) go through the same functions.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from services.config import GatewayConfig
from services.engine.config import context_error
from services.rpc import pb
from services.tiers import Tier

from .codec import TextCodec
from .errors import bad_request, not_found
from .upstream import Upstream

# The engine's MIN_TEMPERATURE (services/engine/model/sampling.py; importing it would import torch): below
# it dividing logits by the temperature overflows float32, so such a request is sent as greedy.
GREEDY_BELOW = 1e-5
# A top_p below the top token's probability (at least 1/vocab) keeps that token alone, whatever its
# value; raised to this it stays so, and stays above 0 once sent as a float32.
MIN_TOP_P = 1e-9


def prompt_ids(codec: TextCodec, body: Any, chat: bool) -> list[int]:
    if chat:
        try:
            ids = codec.apply_chat_template(body.template_messages(), add_generation_prompt=True)
        except ValueError as e:  # the template refused the conversation (or there is none)
            raise bad_request(str(e), "messages") from e
    else:
        prompt = body.prompt_value()
        if isinstance(prompt, str):
            ids = codec.encode(prompt, add_special_tokens=True)
        else:
            ids = list(prompt)
            outside = next((t for t in ids if not 0 <= t < codec.vocab_size), None)
            if outside is not None:
                raise bad_request(f"prompt token id {outside} is not in the model's vocabulary "
                                  f"(ids 0..{codec.vocab_size - 1})", "prompt")
    if not ids:
        raise bad_request("prompt is empty", "messages" if chat else "prompt")
    return ids


def max_tokens_for(body: Any, chat: bool, prompt_len: int, max_model_len: int) -> int:
    requested = body.token_budget if chat else body.max_tokens
    max_tokens = requested if requested is not None else (max_model_len - prompt_len if chat else 16)
    too_long = context_error(prompt_len, max_tokens, max_model_len)
    if too_long is not None:
        raise bad_request(too_long, "messages" if chat else "prompt", "context_length_exceeded")
    return max_tokens


def sampling(body: Any, max_tokens: int) -> pb.SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    temperature = temperature if temperature >= GREEDY_BELOW else 0.0
    seed = body.seed
    if seed is None and temperature > 0:
        # The engine draws token i from a generator seeded by (seed, i): with a seed fixed here, a
        # request resumed on another group after a failure goes on drawing the same stream.
        seed = secrets.randbits(63)
    top_p = 1.0 if body.top_p is None else max(body.top_p, MIN_TOP_P)
    return pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=body.top_k or 0,
                             top_p=top_p, has_seed=seed is not None, seed=seed or 0,
                             ignore_eos=bool(body.ignore_eos))


async def queued_request(config: GatewayConfig, codec: TextCodec, upstream: Upstream, body: Any, chat: bool,
                         tier: str, request_id: str, arrival: float | None = None,
                         offload: bool = True) -> pb.QueuedRequest:
    """What a request's body becomes in the tier queue, an HTTP request's (app.py) or a batch's
    line: the model (404), readiness (503), tokens (off the event loop when `offload`) and the
    context (400)."""
    arrival = time.time() if arrival is None else arrival
    if body.model != config.served_model_name:
        raise not_found(f"model {body.model[:200]!r} is not served here; use {config.served_model_name!r}",
                        "model", "model_not_found")
    max_model_len = await upstream.ready()
    ids = await asyncio.to_thread(prompt_ids, codec, body, chat) if offload else prompt_ids(codec, body, chat)
    max_tokens = max_tokens_for(body, chat, len(ids), max_model_len)
    return pb.QueuedRequest(request_id=request_id, tier=tier, arrival_s=arrival, prompt_ids=ids,
                            sampling=sampling(body, max_tokens), slo=tier_slo(config.policy.tier(tier)))


def tier_slo(tier: Tier) -> pb.TierSLO:
    """The targets the engines schedule a request of this tier by (services/engine/policy.py)."""
    return pb.TierSLO(ttft_s=tier.ttft_s, tpot_s=tier.tpot_s, weight=tier.weight, max_wait_s=tier.max_wait_s)
