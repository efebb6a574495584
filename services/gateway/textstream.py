"""Token ids -> text, incrementally, with stop strings: what the gateway streams to the client."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextAssembler:
    """Keeps the ids of one request and hands out only text that is final.

    Text is held back while it ends in an incomplete UTF-8 sequence (U+FFFD) or could still be
    the start of a stop string. Once a stop string appears, text ends before it and `stopped`
    is set (the caller then cancels the request upstream).
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()) -> None:
        self._decode = decode
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self._sent = 0
        self.stopped = False

    def add(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self._decode(self.ids)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text, cut)
        end = len(text) - self._hold
        if text.endswith("\ufffd"):
            end = min(end, len(text) - 1)
        return self._emit(text, end)

    def finish(self) -> str:
        """The rest of the text once the request has finished."""
        if self.stopped:
            return ""
        text = self._decode(self.ids)
        cut = self._stop_at(text)
        return self._emit(text, len(text) if cut is None else cut)

    @property
    def text(self) -> str:
        return self._decode(self.ids)

    def _stop_at(self, text: str) -> int | None:
        hits = [i for s in self._stops if (i := text.find(s, max(0, self._sent - len(s)))) >= 0]
        return min(hits) if hits else None

    def _emit(self, text: str, end: int) -> str:
        if end <= self._sent:
            return ""
        out = text[self._sent:end]
        self._sent = end
        return out
