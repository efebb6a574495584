"""The output fold: what the client sees of a stream written by several producers over its life."""

from __future__ import annotations

from services.cluster.events import fold
from services.rpc import pb


def ev(ids: list[int], index: int, attempt: int = 0, finish: str = "", group: str = "") -> pb.TokenEvent:
    return pb.TokenEvent(token_ids=ids, index=index, attempt=attempt, finish_reason=finish, next_group=group)


def test_tokens_in_order_and_the_holder_named_last() -> None:
    f = fold([ev([1], 0, group="d0"), ev([2, 3], 1, group="d0"), ev([], 3, group="d1"), ev([4], 3, finish="length")])
    assert f.tokens == [1, 2, 3, 4] and f.finish_reason == "length" and f.owner == "d1" and f.gaps == 0


def test_a_resumed_attempt_fences_the_old_holder_and_repeats_nothing() -> None:
    events = [ev([1], 0), ev([2], 1), ev([], 0, attempt=1),  # the router's fence for attempt 1
              ev([3], 2), ev([4], 3),  # the old holder, still writing: ignored
              ev([2, 3], 1, attempt=1), ev([5], 3, attempt=1, finish="stop")]  # resumed from an earlier token
    f = fold(events)
    assert f.tokens == [1, 2, 3, 5] and f.finish_reason == "stop"


def test_nothing_counts_after_the_end_and_an_error_ends_it() -> None:
    f = fold([ev([1], 0, finish="stop"), ev([2], 1)])
    assert f.tokens == [1]
    err = pb.TokenEvent(error=pb.Error(kind=pb.OVERLOADED, message="full"))
    f = fold([err, ev([1], 0)])
    assert f.done and f.error is not None and f.error.message == "full" and f.tokens == []


def test_a_gap_is_counted_not_hidden() -> None:
    f = fold([ev([1], 0), ev([9], 5)])
    assert f.tokens == [1, 9] and f.gaps == 1
