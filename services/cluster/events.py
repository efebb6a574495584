"""What a request's output stream says, read the one way the gateway and the router both read it.

A request's events (`nitsum:out:<id>`, `pb.TokenEvent`) can come from several producers over its
life: the prefill group, then a decode group, groups it migrates to, and, when the group holding
it dies, the groups the router resumes it on (a new `attempt`). Producers that lost the request
may still write for a while (a group that was only slow, not dead). `OutputFold` turns that into
the stream the client sees:

- an event of an older attempt than one already seen is ignored (the router's fence: it writes
  an event of the new attempt before it reads what the client has);
- tokens are placed by their `index`: a token the client already has is never repeated, so a
  resumed attempt that starts again at a token already delivered adds nothing twice;
- the first event with a finish reason or an error ends it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from services.rpc import pb

log = logging.getLogger(__name__)


@dataclass
class OutputFold:
    tokens: list[int] = field(default_factory=list)
    attempt: int = 0
    owner: str = ""  # the group that produces this request's next events, as last named
    finish_reason: str = ""
    error: pb.Error | None = None
    gaps: int = 0  # events that started past the end (a lost event: only after a Redis data loss)

    @property
    def done(self) -> bool:
        return bool(self.finish_reason) or self.error is not None

    def add(self, event: pb.TokenEvent) -> list[int] | None:
        """Fold one event in: the tokens it adds for the client ([] for none), or None when the
        event does not count (an older attempt's, or one after the end)."""
        if self.done or event.attempt < self.attempt:
            return None
        self.attempt = event.attempt
        if event.next_group:
            self.owner = event.next_group
        if event.error.kind != pb.ERROR_KIND_UNSPECIFIED:
            self.error = event.error
            return []
        new = self._place(list(event.token_ids), event.index)
        if event.finish_reason:
            self.finish_reason = event.finish_reason
        return new

    def _place(self, ids: list[int], index: int) -> list[int]:
        have = len(self.tokens)
        if index > have:
            self.gaps += 1
            log.warning("output stream skips tokens %d..%d (lost with a Redis restart?)", have, index - 1)
        new = ids[max(0, have - index):] if index <= have else ids
        self.tokens.extend(new)
        return new


def fold(events: list[pb.TokenEvent]) -> OutputFold:
    out = OutputFold()
    for e in events:
        out.add(e)
    return out
