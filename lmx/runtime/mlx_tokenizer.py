"""The Tokenizer protocol over mlx-lm's TokenizerWrapper: templates, encode/decode, detokenizers.

Built at load by the MLX engine (for the API) and by its worker process (for detokenizing);
encode/decode are then safe from any thread.
Knows the model family's tool-call format and whether it writes <think> blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

from lmx.runtime.engine import LoadConfig
from lmx.runtime.parsers import (
    H_CALL,
    H_CHANNEL,
    H_END,
    H_MESSAGE,
    H_RETURN,
    HARMONY,
    HARMONY_MARKUP,
    MARKUP,
    THINK_CLOSE,
    THINK_OPEN,
    Thinking,
    detect_reasoning,
    detect_tool_parser,
)
from lmx.runtime.textstream import ByteDecoder, IncrementalDecoder, byte_level_table


class MlxTokenizer:
    """The Tokenizer protocol over mlx-lm's TokenizerWrapper. Thread-safe for encode/decode."""

    def __init__(self, wrapper: Any, config: LoadConfig, marker_ids: Mapping[str, int]) -> None:
        self._w = wrapper
        self.marker_ids = marker_ids
        # Byte-level BPE (GPT-2 style) gets a table-driven detokenizer; others decode a window.
        detok = wrapper._detokenizer
        self._byte_table = (
            byte_level_table(detok.tokenmap) if isinstance(detok, BPEStreamingDetokenizer) else None
        )
        self.eos_token_ids = frozenset(int(i) for i in wrapper.eos_token_ids)
        template = getattr(wrapper, "chat_template", None)
        vocab = wrapper.get_vocab()
        self.tool_parser = config.tool_parser or detect_tool_parser(template, vocab)
        if self.tool_parser == "none":
            self.tool_parser = None
        harmony = self.tool_parser == HARMONY
        self.hidden_ids = _hidden_specials(wrapper, MARKUP | HARMONY_MARKUP if harmony else MARKUP)
        self.reasoning = (
            config.reasoning_parser != "none"
            if config.reasoning_parser
            else detect_reasoning(template, vocab)
        )
        if harmony:  # a call ends the output as the answer does
            self.eos_token_ids |= {int(vocab[t]) for t in (H_CALL, H_RETURN) if t in vocab}
        self.thinking = self._thinking(vocab, harmony)

    def _thinking(self, vocab: Mapping[str, int], harmony: bool) -> Thinking | None:
        """How the model's reasoning opens and ends, for a thinking budget: gpt-oss's analysis
        message, else a `<think>` block where the vocabulary has both tags."""
        if harmony and all(t in vocab for t in (H_CHANNEL, H_MESSAGE, H_END)):
            name = [int(i) for i in self._w.encode("analysis", add_special_tokens=False)]
            opens = (int(vocab[H_CHANNEL]), *name, int(vocab[H_MESSAGE]))
            return opens, int(vocab[H_END])
        if THINK_OPEN in vocab and THINK_CLOSE in vocab:
            return (int(vocab[THINK_OPEN]),), int(vocab[THINK_CLOSE])
        return None

    def encode(self, text: str) -> list[int]:
        return list(self._w.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._w.decode(list(ids)))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> list[int]:
        text = self._w.apply_chat_template(
            list(messages),
            tools=list(tools) if tools else None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **dict(extra or {}),
        )
        return list(self._w.encode(text, add_special_tokens=False))

    def detokenizer(self, context: Sequence[int]) -> ByteDecoder | IncrementalDecoder:
        """A fresh streaming detokenizer for one sequence whose prompt ends with `context`."""
        if self._byte_table is not None:
            return ByteDecoder(self._byte_table)
        return IncrementalDecoder(self.decode, context[-6:])


def _hidden_specials(wrapper: Any, markup: frozenset[str]) -> frozenset[int]:
    """The special tokens a sequence's text leaves out, as OpenAI's and vLLM's do: chat markup
    such as `<|im_end|>` that a model writes past an ignored EOS, or mid-answer. The `markup` the
    output parsers read (`<tool_call>`, `[TOOL_CALLS]`, `<think>`, ...) stays."""
    added = getattr(wrapper._tokenizer, "added_tokens_decoder", None) or {}
    return frozenset(
        int(i) for i, t in added.items() if getattr(t, "special", False) and str(t) not in markup
    )
