"""The config bench.server writes for `lmx serve`: read back by lmx's own loader, with the
engine's prompt cache budget the run asked for (`bench.run_throughput --prompt-cache`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.run_throughput import parse_args
from bench.server import config_yaml
from lmx.reconciler import manifest
from lmx.reconciler.spec import EngineSpec


def _engine(tmp_path: Path, prompt_cache_bytes: int | None) -> EngineSpec:
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml("m", tmp_path, 8, 512, prompt_cache_bytes))
    return manifest.load(path).models["m"].engine


@pytest.mark.parametrize("nbytes", [0, 256 * 2**20])
def test_the_config_gives_the_engine_the_prompt_cache_asked_for(
    tmp_path: Path, nbytes: int
) -> None:
    engine = _engine(tmp_path, nbytes)
    assert (engine.prompt_cache_bytes, engine.max_batch, engine.context_length) == (nbytes, 8, 512)


def test_without_a_prompt_cache_size_the_engine_keeps_its_default(tmp_path: Path) -> None:
    assert _engine(tmp_path, None).prompt_cache_bytes == EngineSpec().prompt_cache_bytes


@pytest.mark.parametrize(
    ("given", "nbytes"),
    [([], None), (["--prompt-cache", "0"], 0), (["--prompt-cache", "64MiB"], 64 << 20)],
)
def test_prompt_cache_sizes_are_read_as_lmx_reads_them(
    given: list[str], nbytes: int | None
) -> None:
    assert parse_args(given).prompt_cache_bytes == nbytes


@pytest.mark.parametrize("bad", ["lots", "-5MiB", "12 parsecs"])
def test_a_bad_prompt_cache_size_is_refused_naming_the_option(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args([f"--prompt-cache={bad}"])
    assert f"--prompt-cache: {bad!r} is not a size" in capsys.readouterr().err
