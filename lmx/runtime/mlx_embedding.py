"""Embeddings from a causal language model's last hidden states, in the worker process.

A model's sentence-transformers files say how its token states become one vector (Qwen3-Embedding,
gte-Qwen2 and e5-mistral pool the last token); a model without them is pooled by the mean of its
tokens' states. Every vector is scaled to length 1, as OpenAI's are. Rows of a batch are padded
on the right: in a causal model no token sees the padding after it, so each row's states are the
ones it has alone. Such a model answers embedding requests only (the engine refuses it text).
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from lmx.runtime.store import EMBEDDING_MARKER


class Pooling(StrEnum):
    MEAN = "mean"
    LAST = "last"
    CLS = "cls"


# sentence-transformers' Pooling config keys, and the pooling each stands for (after the scaling
# to length 1, mean_sqrt_len is the mean).
_MODES = {
    "pooling_mode_mean_tokens": Pooling.MEAN,
    "pooling_mode_mean_sqrt_len_tokens": Pooling.MEAN,
    "pooling_mode_lasttoken": Pooling.LAST,
    "pooling_mode_cls_token": Pooling.CLS,
}


def pooling_of(path: Path) -> Pooling:
    """How the model at `path` pools, from its `modules.json` and the Pooling module's
    `config.json`; the mean where it has none. Raises ValueError for a mode lmx lacks (max,
    weighted mean, several at once), naming the file."""
    modules_file = path / EMBEDDING_MARKER
    if not modules_file.is_file():
        return Pooling.MEAN
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{modules_file}: not a list of modules")
    folder = next(
        (str(m.get("path", "")) for m in modules if str(m.get("type", "")).endswith("Pooling")),
        None,
    )
    config_file = path / folder / "config.json" if folder is not None else None
    if config_file is None or not config_file.is_file():
        return Pooling.MEAN
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: not a mapping of settings")
    chosen = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
    if len(chosen) == 1 and chosen[0] in _MODES:
        return _MODES[chosen[0]]
    raise ValueError(
        f"{config_file}: pooling by {' + '.join(chosen) or 'nothing'} is not supported"
        " (lmx pools by the mean, the last token or the first)"
    )


def hidden_states_model(model: Any) -> Any:
    """The part of an mlx-lm model that returns its last hidden states (before the LM head), or
    None where the architecture keeps it under another name."""
    inner = getattr(model, "model", None)
    return inner if callable(inner) and hasattr(inner, "layers") else None


def embed_rows(model: Any, rows: list[list[int]], pooling: Pooling, chunk: int) -> np.ndarray:
    """One float32 vector of length 1 per row of token ids, `chunk` positions of the padded batch
    through the model at a time (a long row's attention stays within a prefill's memory)."""
    inner = hidden_states_model(model)
    width = max(len(r) for r in rows)
    ids = mx.array([r + [0] * (width - len(r)) for r in rows])
    lengths = mx.array([len(r) for r in rows])[:, None]
    cache = make_prompt_cache(model)
    pooled: mx.array | None = None
    for start in range(0, width, chunk):
        states = inner(ids[:, start : start + chunk], cache=cache).astype(mx.float32)
        at = mx.arange(start, start + states.shape[1])[None, :]
        part = (states * _weights(pooling, at, lengths)[..., None]).sum(axis=1)
        pooled = part if pooled is None else pooled + part
        mx.eval(pooled)
    assert pooled is not None, "no rows, or only empty ones"
    norms = mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return np.array(pooled / norms, dtype=np.float32)


def _weights(pooling: Pooling, at: mx.array, lengths: mx.array) -> mx.array:
    """Each position's share of its row's vector (rows x positions): padding has none."""
    match pooling:
        case Pooling.MEAN:
            return (at < lengths).astype(mx.float32) / lengths.astype(mx.float32)
        case Pooling.LAST:
            return (at == lengths - 1).astype(mx.float32)
        case Pooling.CLS:
            return mx.broadcast_to(at == 0, (lengths.shape[0], at.shape[1])).astype(mx.float32)
