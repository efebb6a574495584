"""Token ids -> text, incrementally, with stop strings: what the gateway streams to the client."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextAssembler:
    """Keeps the ids of one request and hands out only text that is final.

    Text is held back while it ends in an incomplete UTF-8 sequence (U+FFFD) or could still be
    the start of a stop string. Once a stop string appears, text ends before it and `stopped`
    is set (the caller then cancels the request upstream).

    Decoding is incremental (as vLLM does it): each new token is decoded with the few tokens
    before it, and the text it adds is the difference between that window's text with and
    without it, so a long answer costs O(tokens), not O(tokens^2); the window starts on a token
    boundary both decodes share, so tokenizers that drop a leading space agree with themselves.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()) -> None:
        self._decode = decode
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self._prefix = 0  # the window's first id
        self._read = 0  # ids before this are in `_text`
        self._text = ""  # final text of ids[:_read]
        self._sent = 0
        self.stopped = False

    def add(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        self._advance(final=False)
        text = self._text
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text, cut)
        return self._emit(text, len(text) - self._hold)

    @property
    def watching(self) -> bool:
        """Whether there are stop strings to look for as text arrives."""
        return bool(self._stops)

    def keep(self, ids: Sequence[int]) -> None:
        """Take ids without decoding them yet: `finish` (or the next `add`) decodes them all at once."""
        self.ids.extend(ids)

    def finish(self) -> str:
        """The rest of the text once the request has finished."""
        if self.stopped:
            return ""
        self._advance(final=True)
        text = self._text
        cut = self._stop_at(text)
        return self._emit(text, len(text) if cut is None else cut)

    @property
    def text(self) -> str:
        return self._decode(self.ids)

    def _advance(self, final: bool) -> None:
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def _stop_at(self, text: str) -> int | None:
        hits = [i for s in self._stops if (i := text.find(s, max(0, self._sent - len(s)))) >= 0]
        return min(hits) if hits else None

    def _emit(self, text: str, end: int) -> str:
        if end <= self._sent:
            return ""
        out = text[self._sent:end]
        self._sent = end
        return out
