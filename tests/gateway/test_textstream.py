"""Streaming text is final text: held back across broken UTF-8 and possible stop strings."""

from __future__ import annotations

from services.gateway.textstream import TextAssembler


def _decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_multibyte_character_is_sent_only_once_complete() -> None:
    a = TextAssembler(_decode)
    euro = list("€".encode())
    assert a.add([ord("a")]) == "a"
    assert a.add(euro[:1]) == "" and a.add(euro[1:2]) == ""
    assert a.add(euro[2:]) == "€"
    assert a.finish() == ""


def test_stop_string_split_over_tokens_is_never_sent() -> None:
    a = TextAssembler(_decode, stops=("END",))
    out = "".join(a.add([b]) for b in b"hello EN")
    assert out == "hello " and not a.stopped
    assert a.add([ord("D")]) == "" and a.stopped
    assert a.add([ord("x")]) == "" and a.finish() == ""


def test_pieces_add_up_to_the_whole_text() -> None:
    a = TextAssembler(_decode, stops=("zz",))
    data = "naïve café — ok".encode()
    pieces = [a.add([b]) for b in data] + [a.finish()]
    assert "".join(pieces) == data.decode()
