"""Streamed text: detokenizing one sequence token by token, and stop strings over the result.

Pure and per sequence; the engine's worker feeds it tokens and segments. A stop string may span
any number of tokens, so the matcher works on text, not token ids; it holds back what could
still become a stop and never emits the stop itself.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class StopMatcher:
    stops: tuple[str, ...]
    _held: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.stops = tuple(s for s in self.stops if s)
        self._hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add `text`; return (text safe to emit now, the stop string it reached if any: the one
        that starts first)."""
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf, None
        found = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            cut, stop = min(found)
            self._held = ""
            return buf[:cut], stop
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], None

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


class ByteDecoder:
    """Streaming detokenizer for byte-level BPE: a table lookup and an incremental UTF-8 decoder.

    Exact (the concatenated output equals decoding all tokens at once) and allocation-light, which
    matters in the worker process, where every sequence decodes every step.
    """

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self._table = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        piece = self._table[token] if token < len(self._table) else b""
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class IncrementalDecoder:
    """Streaming detokenizer for any tokenizer, by decoding a short sliding window of tokens.

    Starts from the prompt's last tokens so that the first generated token keeps the spacing it
    has in context (SentencePiece drops a leading space when a token is decoded alone).
    """

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._tokens = list(context)
        self._prefix = 0
        self._read = len(self._tokens)

    def add(self, token: int) -> str:
        self._tokens.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read == len(self._tokens):
            return ""
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        if after.endswith("\ufffd") and not final:
            return ""  # an incomplete UTF-8 character: wait for the next token
        self._prefix, self._read = self._read, len(self._tokens)
        return after[len(before) :]


def byte_level_table(tokens: Sequence[str]) -> list[bytes]:
    """Bytes of each token of a byte-level BPE vocabulary (GPT-2's printable byte alphabet)."""
    alphabet = _bytes_to_unicode()
    inverse = {c: b for b, c in alphabet.items()}
    return [
        bytes(inverse[c] for c in t) if all(c in inverse for c in t) else t.encode() for t in tokens
    ]


def _bytes_to_unicode() -> dict[int, str]:
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
