"""Live migration of a running decode request from one group to another.

Pre-copy: while the request keeps decoding on the source, copy the KV of every token computed so
far, in rounds, to the destination (computed KV never changes, so these copies stay valid). When
what is left is below a block, pause: detach the request from the source batch, copy the last
tokens' KV with the request's state (tokens so far, sampler RNG), and start it on the destination.
The pause covers only the last few tokens, so it does not grow with the context length.

The copy itself goes through a `KVChannel`: in-process here, a kvtransfer backend between
processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from services.engine import KVExport, LLMEngine


class KVChannel(Protocol):
    def __call__(self, request_id: str, start: int, kv: KVExport) -> None: ...


@dataclass
class MigrationReport:
    request_id: str
    rounds: int
    tokens_precopied: int
    tokens_in_pause: int
    pause_s: float


def local_channel(dst: LLMEngine) -> KVChannel:
    def send(request_id: str, start: int, kv: KVExport) -> None:
        dst.receive_kv(request_id, start, kv)

    return send


def migrate(src: LLMEngine, dst: LLMEngine, request_id: str, keep_decoding: Callable[[], object],
            channel: KVChannel | None = None, max_rounds: int = 8) -> MigrationReport:
    """Move `request_id` from `src` to `dst`. `keep_decoding` runs source steps between rounds."""
    channel = channel or local_channel(dst)
    dst.begin_receive(request_id, *src.prompt_of(request_id), src.slo_of(request_id))
    copied, rounds = 0, 0
    try:
        while rounds < max_rounds:
            computed = src.computed_tokens(request_id)
            if computed - copied < src.args.block_size:
                break
            channel(request_id, copied, src.export_kv(request_id, copied, computed))
            copied, rounds = computed, rounds + 1
            keep_decoding()
            if not src.has_request(request_id):  # it finished while we copied: nothing to move
                dst.abort(request_id)
                return MigrationReport(request_id, rounds, copied, 0, 0.0)
        start = time.perf_counter()
        src.detach(request_id)
        last = src.export_kv(request_id, copied)
        channel(request_id, copied, last)
        dst.finish_receive(request_id, src.generated_ids(request_id), src.computed_tokens(request_id))
        pause = time.perf_counter() - start
    except Exception:
        dst.abort(request_id)
        raise
    src.release(request_id)
    return MigrationReport(request_id, rounds, copied, last.num_tokens, pause)
