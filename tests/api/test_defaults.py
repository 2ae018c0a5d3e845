"""A request that leaves sampling fields out gets its model spec's defaults, else its model's own
(generation_config.json), else OpenAI's; a field it sends wins over both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import httpx

from lmx.api.app import create_app
from lmx.api.deps import AppDeps
from lmx.runtime.engine import LoadConfig
from lmx.runtime.mlx_engine import MlxEngine
from lmx.runtime.registry import EngineRegistry
from lmx.runtime.sampling import SamplingDefaults
from tests.api.conftest import StaticModels


async def test_sampling_fields_left_out_come_from_the_spec_then_the_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "greedy"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0}))
    registry = EngineRegistry(MlxEngine)
    await registry.load(LoadConfig(model_id="m", path=model, max_batch=4))
    models = StaticModels(registry)
    app = create_app(AppDeps(registry=registry, models=models))
    ask = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12}
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://lmx.test"
        ) as client:

            async def said(**fields: Any) -> str:
                r = await client.post("/v1/chat/completions", json={**ask, **fields})
                assert r.status_code == 200, r.text
                text: str = r.json()["choices"][0]["message"]["content"]
                return text

            greedy = await said(temperature=0)
            # The model's generation_config.json: greedy, where OpenAI's default samples at 1.
            assert [await said(seed=1), await said(seed=2)] == [greedy, greedy]
            # Its spec's default wins: sampled at 2, each seed its own answer.
            models.specs["m"] = SamplingDefaults(temperature=2.0)
            hot = {await said(seed=s) for s in (1, 2, 3)}
            assert len(hot) == 3 and greedy not in hot
            # A field the request sends wins over both.
            assert await said(temperature=0, seed=1) == greedy
            # A response says the temperature it was sampled at, the default filled in.
            ask_response = {"model": "m", "input": "Hi", "max_output_tokens": 2}
            r = await client.post("/v1/responses", json=ask_response)
            assert (r.json()["temperature"], r.json()["top_p"]) == (2.0, 1.0)
            r = await client.post("/v1/responses", json={**ask_response, "temperature": 0.5})
            assert r.json()["temperature"] == 0.5
    finally:
        await registry.unload("m")
