"""/v1/embeddings: the request's inputs as token ids, and the engine's vectors in OpenAI's shape."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from lmx.api.generation import texts_or_ids
from lmx.api.schemas import EmbeddingRequest
from lmx.errors import RequestError
from lmx.runtime.engine import Embeddings, Tokenizer

MAX_INPUTS = 2048  # OpenAI's limit per request


def token_rows(body: EmbeddingRequest, tokenizer: Tokenizer) -> list[list[int]]:
    """One row of token ids per input, the texts encoded as the model's tokenizer encodes a
    document (with its special tokens: the end-of-text token a last-token pooling model reads)."""
    items = texts_or_ids(body.input)
    if not items:
        raise RequestError("input is empty: give a text, or a list of texts", param="input")
    if len(items) > MAX_INPUTS:
        raise RequestError(
            f"input has {len(items)} items; at most {MAX_INPUTS} may be embedded at once",
            param="input",
        )
    rows = []
    for i, item in enumerate(items):
        if not item:
            raise RequestError(f"input {i} is empty", param="input")
        rows.append(tokenizer.encode(item) if isinstance(item, str) else [int(t) for t in item])
    return rows


def embeddings_body(body: EmbeddingRequest, result: Embeddings) -> dict[str, Any]:
    """OpenAI's answer: each vector (cut to `dimensions` and scaled to length 1 again, where
    asked) as floats or as base64 of its little-endian float32 bytes."""
    vectors = np.frombuffer(result.vectors, dtype="<f4").reshape(result.count, result.dimensions)
    if body.dimensions is not None:
        if body.dimensions > result.dimensions:
            raise RequestError(
                f"dimensions {body.dimensions} is more than this model's {result.dimensions}",
                param="dimensions",
            )
        vectors = vectors[:, : body.dimensions]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = (vectors / np.maximum(norms, 1e-12)).astype("<f4")

    def encoded(v: np.ndarray) -> list[float] | str:
        if body.encoding_format == "base64":
            return base64.b64encode(v.tobytes()).decode("ascii")
        return [float(x) for x in v]

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encoded(v)}
            for i, v in enumerate(vectors)
        ],
        "model": body.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
