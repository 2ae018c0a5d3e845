"""Sampling defaults (lmx.runtime.sampling): the model's, its spec's, and which wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmx.errors import ConfigError
from lmx.reconciler.manifest import parse
from lmx.runtime.sampling import SamplingDefaults, model_defaults


def test_a_spec_s_defaults_win_over_the_model_s_field_by_field() -> None:
    model = SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20)
    spec = SamplingDefaults(temperature=0.2, min_p=0.05)
    assert spec.over(model) == SamplingDefaults(temperature=0.2, top_p=0.95, top_k=20, min_p=0.05)
    assert SamplingDefaults().over(model) == model


def test_the_model_s_are_the_sampling_fields_of_its_generation_config(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": 1,
                "do_sample": True,  # vLLM leaves it aside too: the fields below are the defaults
                "temperature": 0.6,
                "top_p": 0.95,
                "top_k": 20,
                "repetition_penalty": None,
                "min_p": 3,  # out of its range: left out, the others kept
            }
        )
    )
    assert model_defaults(tmp_path) == SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20)


@pytest.mark.parametrize("text", [None, "{not json", "[0.6]"])
def test_a_model_without_a_readable_generation_config_sets_none(
    tmp_path: Path, text: str | None
) -> None:
    if text is not None:
        (tmp_path / "generation_config.json").write_text(text)
    assert model_defaults(tmp_path) == SamplingDefaults()


def test_a_spec_s_sampling_is_checked_against_the_request_ranges() -> None:
    spec = parse("models:\n  m:\n    source: x/y\n    sampling: {temperature: 0.7, top_k: 20}\n")
    assert spec.models["m"].sampling == SamplingDefaults(temperature=0.7, top_k=20)
    bad = "models:\n  m:\n    source: x/y\n    sampling:\n      temperature: 3\n      topp: 1\n"
    with pytest.raises(ConfigError) as info:
        parse(bad)
    errors = info.value.errors
    assert errors[0].startswith("models.m.sampling.temperature (line 5):"), errors
    assert "less than or equal to 2" in errors[0]
    assert errors[1] == "models.m.sampling.topp (line 6): unknown key", errors


def test_a_change_of_sampling_is_no_reload() -> None:
    before = parse("models:\n  m: {source: x/y}\n").models["m"]
    after = parse("models:\n  m: {source: x/y, sampling: {temperature: 0}}\n").models["m"]
    assert after.load_key == before.load_key and after.load_digest() == before.load_digest()
