"""Follower ranks are dispatchers: a message runs the handler its module registered, in spawned
rank processes too, and a message nobody registered stops the rank with an error that says so."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from services.engine import EngineArgs, EngineError, LLMEngine
from services.engine.worker import handler_modules, serve_rank
from tests.engine.rank_handlers import KeepResource, ReportRank


def test_spawned_ranks_run_handlers_registered_outside_the_engine(llama_dir) -> None:
    assert "tests.engine.rank_handlers" in handler_modules()
    engine = LLMEngine(EngineArgs(model=str(llama_dir), tp=2, dist_prefix="worker-test/"))
    try:
        engine.send_to_ranks(ReportRank(offset=100))
        ranks = engine.all_gather(torch.tensor([0]))
    finally:
        engine.shutdown()
    assert [int(t.item()) for t in ranks] == [0, 101]


class _Unregistered:
    pass


class _Resource:
    closed = False

    def close(self) -> None:
        self.closed = True


class _Group:
    """Broadcasts the given messages in turn, as a leader would."""

    rank = 1

    def __init__(self, messages: list[Any]) -> None:
        self.messages = messages

    def broadcast_object(self, obj: Any = None) -> Any:
        return self.messages.pop(0)


def test_a_message_without_a_handler_stops_the_rank_and_closes_what_it_kept() -> None:
    resource = _Resource()
    with pytest.raises(EngineError, match="no handler for _Unregistered"):
        serve_rank(None, _Group([KeepResource(resource), _Unregistered()]))  # type: ignore[arg-type]
    assert resource.closed
