"""Constrained decoding on MLX: llguidance token masks applied as per-sequence logits processors.

The MLX engine builds one `ConstraintFactory` per loaded model (the llguidance tokenizer is costly
to build) and calls `make_processor` per constrained request; processors run in its worker process.
Backend-neutral (CPU, CUDA, Metal): llguidance computes the mask, plain MLX ops apply it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
from numpy.typing import NDArray

from lmx.errors import PermanentError

OnError = Literal["raise", "end"]
# Terse errors: the verbose ones dump parser state and the whole grammar into the message.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


class ConstraintError(PermanentError):
    """A grammar did not compile for this tokenizer, or generation left it."""


class ConstrainedProcessor:
    """The logits processor of one sequence: every token its grammar forbids gets -inf.

    Called as `proc(tokens, logits[1, V])` once per step, before sampling; `tokens` ends with the
    token sampled at the previous step (on the first call, with the prompt), which it consumes
    first. Once the grammar is complete only EOS is allowed, so the sequence ends with "stop".
    One sequence, one thread. On a matcher error: `on_error="raise"` raises ConstraintError;
    `"end"` records it in `error` and allows only EOS, so that only this sequence ends.
    """

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        vocab_size: int,
        n_vocab: int,
        eos_token_ids: list[int],
        on_error: OnError,
    ) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._bitmask = allocate_token_bitmask(1, n_vocab)  # reused: llguidance fills it in place
        self._check_clipped = n_vocab > vocab_size
        eos_only = np.zeros((1, vocab_size), dtype=np.bool_)
        eos_only[0, [i for i in eos_token_ids if i < vocab_size]] = True
        self._eos_only = mx.array(eos_only)
        self._on_error = on_error
        self._started = False
        self.error: str | None = None
        self.steps = 0  # calls so far; the tokens consumed are one fewer

    @property
    def done(self) -> bool:
        """Nothing but EOS may follow: the match is complete, or it failed (see `error`)."""
        return self.error is not None or bool(self._matcher.is_stopped())

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # Reading the sampled token waits for the previous step: the one sync constraints need.
        token: int | None = tokens[-1].item() if self._started else None  # type: ignore[assignment]
        self._started = True
        self.steps += 1
        if self.error is None:
            self._advance(token)
        allowed = self._eos_only if self.error is not None else mx.array(self._allowed())
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))

    def _advance(self, token: int | None) -> None:
        m = self._matcher
        if token is not None and not m.consume_token(token):
            return self._fail(f"token {token} is not allowed here")
        fill_next_token_bitmask(m, self._bitmask)
        if m.is_error():
            return self._fail("the matcher failed")
        if self._check_clipped and not self._allowed().any():
            return self._fail("the grammar allows only tokens outside the model's vocabulary")
        return None

    def _allowed(self) -> NDArray[np.bool_]:
        """The bitmask as (1, V) booleans (token 32w + i is bit i of word w); faster on the CPU
        backend than unpacking in MLX, and only V bytes to copy to a GPU."""
        bits = np.unpackbits(
            self._bitmask.view(np.uint8), count=self._vocab_size, bitorder="little"
        )
        return bits.view(np.bool_).reshape(1, self._vocab_size)

    def _fail(self, what: str) -> None:
        detail = self._matcher.get_error().removesuffix("<non-verbose/>").strip() or what
        self.error = f"constrained decoding failed at generated token {self.steps - 1}: {detail}"
        if self._on_error == "raise":
            raise ConstraintError(self.error)


class ConstraintFactory:
    """Compiles grammars for one model. Build once per loaded model (~1 s for a large vocabulary).

    `tokenizer` is mlx-lm's TokenizerWrapper or a fast Hugging Face tokenizer; `vocab_size` is the
    model's logits width, which may differ from the tokenizer's size (extra rows are masked).
    """

    def __init__(
        self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int] | None = None
    ) -> None:
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        eos = (
            eos_token_ids if eos_token_ids is not None else getattr(tokenizer, "eos_token_ids", ())
        )
        self.eos_token_ids = sorted({int(i) for i in eos} or {int(hf.eos_token_id)})
        self.vocab_size = int(vocab_size)
        self.n_vocab = max(self.vocab_size, len(hf))
        self.tokenizer = llguidance.hf.from_tokenizer(
            hf, n_vocab=self.n_vocab, eos_token=list(self.eos_token_ids)
        )
        # llguidance counts every added `<...>` token as special, whatever the tokenizer says.
        added = getattr(hf, "added_tokens_decoder", {})
        self.marker_ids: dict[str, int] = {
            str(t.content): int(i)
            for i, t in added.items()
            if self.tokenizer.is_special_token(int(i))
        }

    def make_processor(self, grammar: str, *, on_error: OnError = "raise") -> ConstrainedProcessor:
        """A fresh processor for one sequence. Raises ConstraintError if `grammar` does not compile.

        Compiling takes from well under a millisecond to, for huge schemas, a second.
        """
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=_LIMITS)
        if matcher.is_error():
            raise ConstraintError(f"the grammar does not compile: {matcher.get_error()}")
        return ConstrainedProcessor(
            matcher, self.vocab_size, self.n_vocab, self.eos_token_ids, on_error
        )
