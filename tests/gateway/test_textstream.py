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


def test_incremental_decoding_adds_up_to_decoding_everything(codec) -> None:  # type: ignore[no-untyped-def]
    """With the checkpoint's real tokenizer, token by token or a few at a time, with and without a
    stop string that never appears: the pieces are the whole decode."""
    import random

    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(codec.vocab_size) for _ in range(rng.randrange(1, 60))]
        a = TextAssembler(lambda x: codec.decode(x, skip_special_tokens=True), stops=("\x00never\x00",))
        pieces, i = [], 0
        while i < len(ids):
            n = rng.randrange(1, 4)
            pieces.append(a.add(ids[i:i + n]))
            i += n
        assert "".join(pieces) + a.finish() == codec.decode(ids, skip_special_tokens=True)


def test_ids_kept_undecoded_come_out_whole_at_the_end() -> None:
    a = TextAssembler(_decode)
    data = "naïve café".encode()
    for b in data[:-3]:
        a.keep([b])
    assert a.add(list(data[-3:-1])) == ""  # held: the window ends in half a character
    assert a.add(list(data[-1:])) == "naïve café" and a.finish() == ""
