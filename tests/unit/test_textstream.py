"""Streamed text: detokenizing byte-level BPE token by token gives the text of decoding all at once;
stop strings end the text before them, across token boundaries."""

from __future__ import annotations

import random

from lmx.runtime.textstream import ByteDecoder, StopMatcher

# Whole tokens, characters split over two and four tokens, and bytes that are no UTF-8 at all.
PIECES = [b"a", b" b", "\u00fc".encode(), b"\xc3", b"\xa9", b"\xf0\x9f", b"\x98", b"\x80", b"\xff"]


def test_streamed_text_is_the_whole_decode() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        tokens = [rng.randrange(len(PIECES)) for _ in range(rng.randint(1, 12))]
        decoder = ByteDecoder(PIECES)
        streamed = "".join(decoder.add(t) for t in tokens) + decoder.flush()
        whole = b"".join(PIECES[t] for t in tokens).decode("utf-8", errors="replace")
        assert streamed == whole, tokens


def test_a_character_split_over_tokens_comes_out_once_whole() -> None:
    decoder = ByteDecoder(PIECES)
    texts = [decoder.add(t) for t in (0, 3, 4, 5, 6, 7, 1)]
    assert texts == ["a", "", "\u00e9", "", "", "\U0001f600", " b"]
    assert decoder.add(len(PIECES)) == ""  # an id past the vocabulary: nothing
    assert decoder.add(3) == "" and decoder.flush() == "\ufffd"


def test_a_stop_string_split_over_pieces_ends_the_text_before_it() -> None:
    stops = StopMatcher(("</end>", "STOP"))
    out = [stops.feed(piece) for piece in ("Hello </", "en", "d> more")]
    assert out == [("Hello ", None), ("", None), ("", "</end>")]
    # Of two reached at once, the one that starts first.
    assert StopMatcher(("b", "ab")).feed("xabc") == ("x", "ab")
    # Held-back text that never became a stop comes out at the end.
    stops = StopMatcher(("</end>",))
    assert stops.feed("a </en") == ("a ", None) and stops.flush() == "</en"
