"""Releasing generated text as it grows, without ever releasing a stop string (OpenAI's `stop`).

Text is held back while its end could still become a stop string, or while it ends in the middle
of a multi-byte character (the decoder shows that as U+FFFD until the next token completes it), so
a streamed answer concatenates to exactly the non-streamed one.
"""

from __future__ import annotations

from collections.abc import Sequence

_INCOMPLETE = "\ufffd"


class StopText:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.released = 0  # characters of the text released so far
        self.reached = False  # a stop string was found: the text ends before it

    def feed(self, text: str) -> tuple[str, bool]:
        """`text` is everything generated so far: the part that may be released now, and whether a stop
        string was reached (the text is then cut just before it, and nothing more is to be fed)."""
        cut = self._first_stop(text)
        if cut is not None:
            self.reached = True
            return self._release(text, cut), True
        end = len(text.rstrip(_INCOMPLETE))
        end -= self._partial_stop(text[:end])
        return self._release(text, max(end, self.released)), False

    def finish(self, text: str) -> str:
        """The rest of `text`, at the end of generation (no stop string was reached)."""
        return self._release(text, len(text))

    def _release(self, text: str, end: int) -> str:
        out = text[self.released : end]
        self.released = end
        return out

    def _first_stop(self, text: str) -> int | None:
        longest = max((len(s) for s in self.stops), default=0)
        start = max(0, self.released - longest + 1)  # a stop can only begin where text was held back
        found = [i for s in self.stops if (i := text.find(s, start)) != -1]
        return min(found) if found else None

    def _partial_stop(self, text: str) -> int:
        """How many characters at the end of `text` are the start of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
