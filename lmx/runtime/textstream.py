"""Stop strings over streamed text: hold back what could still become a stop, never emit the stop.

Pure and per sequence; the engine's worker feeds it detokenized segments. A stop string may span
any number of tokens, so the matcher works on text, not token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StopMatcher:
    stops: tuple[str, ...]
    _held: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.stops = tuple(s for s in self.stops if s)
        self._hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        """Add `text`; return (text safe to emit now, whether a stop string was reached)."""
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf, False
        cut = min((i for s in self.stops if (i := buf.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, once the sequence ended for another reason."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        for n in range(min(self._hold, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
