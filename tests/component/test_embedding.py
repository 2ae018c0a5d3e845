"""Embeddings: the pooling math against the model's own hidden states, and the MLX engine's
embedding requests beside its generation batch (the real tiny model, its worker process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from lmx.errors import RequestError
from lmx.runtime.engine import Embeddings, GenerationRequest, LoadConfig, SamplingParams
from lmx.runtime.mlx_embedding import Pooling, embed_rows, pooling_of
from lmx.runtime.mlx_engine import MlxEngine

TEXTS = ["The quick brown fox jumps", "hi", "over the lazy dog"]  # rows of different lengths


def _reference(model: Any, row: list[int], pooling: Pooling) -> np.ndarray:
    """The row alone through the model's layers at once, pooled by hand."""
    states = np.array(model.model(mx.array(row)[None]).astype(mx.float32))[0]
    v = {Pooling.MEAN: states.mean(axis=0), Pooling.LAST: states[-1], Pooling.CLS: states[0]}
    vector: np.ndarray = v[pooling] / np.linalg.norm(v[pooling])
    return vector


@pytest.mark.parametrize("pooling", list(Pooling))
@pytest.mark.parametrize("chunk", [2048, 3])  # whole rows, and through the KV cache
def test_pooled_rows_are_each_rows_own_states_whatever_the_padding(
    tiny_model_dir: Path, pooling: Pooling, chunk: int
) -> None:
    loaded: Any = mlx_lm.load(str(tiny_model_dir))
    model, tokenizer = loaded[0], loaded[1]
    rows = [tokenizer.encode(t) for t in TEXTS]
    got = embed_rows(model, rows, pooling, chunk)
    want = np.stack([_reference(model, r, pooling) for r in rows])
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5)


def _modules(path: Path, **modes: bool) -> Path:
    """A sentence-transformers layout whose Pooling module sets `modes`."""
    (path / "modules.json").write_text(
        json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                },
            ]
        )
    )
    (path / "1_Pooling").mkdir(exist_ok=True)
    config = {"word_embedding_dimension": 64, "include_prompt": True}
    config |= {f"pooling_mode_{k}": v for k, v in modes.items()}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return path


def test_the_pooling_is_the_models_sentence_transformers_config(tmp_path: Path) -> None:
    assert pooling_of(tmp_path) is Pooling.MEAN  # none: the mean
    assert pooling_of(_modules(tmp_path, lasttoken=True, cls_token=False)) is Pooling.LAST
    assert pooling_of(_modules(tmp_path, cls_token=True)) is Pooling.CLS
    assert pooling_of(_modules(tmp_path, mean_sqrt_len_tokens=True)) is Pooling.MEAN
    for i, modes in enumerate(({"max_tokens": True}, {"mean_tokens": True, "cls_token": True})):
        (tmp_path / str(i)).mkdir()
        with pytest.raises(
            ValueError, match=r"1_Pooling/config\.json: pooling by .* not supported"
        ):
            pooling_of(_modules(tmp_path / str(i), **modes))
    (tmp_path / "modules.json").write_text('["Pooling"]')
    with pytest.raises(ValueError, match=r"modules\.json: not a list of modules"):
        pooling_of(tmp_path)


def _matrix(e: Embeddings) -> np.ndarray:
    return np.frombuffer(e.vectors, dtype="<f4").reshape(e.count, e.dimensions)


@contextlib.asynccontextmanager
async def _loaded(path: Path) -> AsyncIterator[MlxEngine]:
    """The model at `path` loaded, as "m", 8-token prefill chunks; unloaded after."""
    e = MlxEngine(LoadConfig(model_id="m", path=path, prompt_cache_bytes=0, prefill_step=8))
    await asyncio.to_thread(e.load)
    try:
        yield e
    finally:
        await asyncio.to_thread(e.unload)


def _embedding_model(tmp_path: Path, tiny_model_dir: Path, **modes: bool) -> Path:
    """A copy of the tiny model published as a sentence-transformers pipeline pooling by `modes`."""
    return _modules(Path(shutil.copytree(tiny_model_dir, tmp_path / "m")), **modes)


async def test_the_engine_embeds_beside_its_generation_batch(tiny_model_dir: Path) -> None:
    model = mlx_lm.load(str(tiny_model_dir))[0]
    async with _loaded(tiny_model_dir) as e:  # no sentence-transformers files: the mean
        greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        prompt = e.tokenizer.encode("a story about a cat")

        async def text() -> str:
            return "".join([d.text async for d in e.stream(GenerationRequest(prompt, greedy))])

        alone = await text()
        # 40 rows, 8-token chunks: several batches of rows, between the generation's steps.
        rows = [e.tokenizer.encode(TEXTS[i % 3] * (1 + i % 4)) for i in range(40)]
        beside, got = await asyncio.gather(text(), e.embed(rows))
        assert beside == alone
        assert (got.count, got.dimensions) == (40, 64)
        assert got.prompt_tokens == sum(map(len, rows))
        want = np.stack([_reference(model, r, Pooling.MEAN) for r in rows])
        np.testing.assert_allclose(_matrix(got), want, atol=2e-5)
        assert e.stats().in_flight == 0


async def test_an_embedding_model_pools_as_it_says_and_writes_no_text(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    path = _embedding_model(tmp_path, tiny_model_dir, lasttoken=True)
    model = mlx_lm.load(str(path))[0]
    async with _loaded(path) as e:
        rows = [e.tokenizer.encode(t) for t in TEXTS]
        want = np.stack([_reference(model, r, Pooling.LAST) for r in rows])
        np.testing.assert_allclose(_matrix(await e.embed(rows)), want, atol=2e-5)
        with pytest.raises(RequestError, match=r"'m' is an embedding model .* /v1/embeddings"):
            await anext(e.stream(GenerationRequest(rows[0], SamplingParams(max_tokens=4))))
        assert e.stats().in_flight == 0


async def test_an_embedding_given_up_leaves_the_worker_serving(tiny_model_dir: Path) -> None:
    async with _loaded(tiny_model_dir) as e:
        rows = [[7] * 500 for _ in range(200)]  # several seconds of rows on the CPU
        task = asyncio.create_task(e.embed(rows))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert e.stats().in_flight == 0
        # The rows left are dropped: the next request is answered at once, not after them.
        got = await asyncio.wait_for(e.embed([e.tokenizer.encode("hi")]), timeout=3)
        assert got.count == 1


async def test_a_model_pooled_in_a_way_lmx_lacks_says_why(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    path = _embedding_model(tmp_path, tiny_model_dir, max_tokens=True)
    async with _loaded(path) as e:
        with pytest.raises(RequestError, match=r"model 'm' cannot embed: .*pooling_mode_max"):
            await e.embed([[1, 2, 3]])
        assert e.stats().in_flight == 0
