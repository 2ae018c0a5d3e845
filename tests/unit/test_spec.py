"""The desired-state schema: valid files parse; bad ones fail naming the field path and the line."""

from __future__ import annotations

import pytest

from lmx.errors import ConfigError
from lmx.reconciler.manifest import parse
from lmx.reconciler.spec import Want, parse_bytes, parse_duration_s


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.errors


def test_the_design_example_parses_with_units() -> None:
    d = parse(
        "memory:\n  budget: 400GiB\n"
        "models:\n"
        "  qwen3-8b:\n"
        "    source: mlx-community/Qwen3-8B-4bit\n"
        "    revision: main\n"
        "    want: pinned\n"
        "    aliases: [gpt-4o-mini]\n"
        "    idle_ttl: 1h\n"
        "    engine: {max_batch: 16, context_length: 32768}\n"
    )
    m = d.models["qwen3-8b"]
    assert m.want is Want.PINNED and m.is_hub
    assert m.idle_ttl_s == 3600.0
    assert m.engine.context_length == 32768
    assert d.memory.budget_bytes(10**12) == 400 * 2**30
    assert d.resolve("gpt-4o-mini") == "qwen3-8b"
    assert d.resolve("nope") is None


def test_percent_budget_and_defaults() -> None:
    d = parse("models:\n  t: {source: builtin:tiny}\n")
    assert d.memory.budget_bytes(1000) == 900
    assert d.jit is True and d.models["t"].want is Want.RESIDENT and d.models["t"].is_builtin


def test_empty_file_is_an_empty_desired_state() -> None:
    assert parse("").models == {}
    assert parse("models:\n").models == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "models:\n  m:\n    source: x/y\n    wnat: pinned\n",
            "models.m.wnat (line 4): unknown key",
        ),
        ("colour: blue\n", "colour (line 1): unknown key"),
        (
            "models:\n  m:\n    source: x/y\n    engine:\n      max_batch: lots\n",
            "models.m.engine.max_batch (line 5): Input should be a valid integer",
        ),
        (
            "models:\n  m:\n    source: x/y\n    want: always\n",
            "models.m.want (line 4): Input should be",
        ),
        ("memory: {budget: 12 parsecs}\n", "memory.budget (line 1): '12 parsecs' is not a size"),
        ("memory: {budget: 140%}\n", "memory.budget (line 1): a percentage budget must be in"),
        (
            "models:\n  m: {source: x/y, idle_ttl: soon}\n",
            "models.m.idle_ttl (line 2): 'soon' is not a duration",
        ),
        ("models:\n  m: {want: pinned}\n", "models.m.source (line 2): Field required"),
    ],
)
def test_bad_fields_are_named_with_their_line(text: str, expected: str) -> None:
    assert any(e.startswith(expected) for e in errors_of(text)), errors_of(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "models:\n  a:\n    source: x/y\n    aliases: [b]\n  b:\n    source: x/z\n",
            "models.a.aliases.0 (line 4): alias 'b' is already the id of model 'b'",
        ),
        (
            "models:\n  a: {source: x/y, aliases: [c]}\n  b: {source: x/z, aliases: [c]}\n",
            "models.b.aliases.0 (line 3): alias 'c' is already an alias of model 'a'",
        ),
        (
            "models:\n  a: {source: x/y, aliases: [a]}\n",
            "models.a.aliases.0 (line 2): alias 'a' is the model's own id",
        ),
    ],
)
def test_alias_clashes_name_the_alias(text: str, expected: str) -> None:
    assert errors_of(text) == [expected]


def test_invalid_yaml_names_the_line() -> None:
    (err,) = errors_of("models:\n  m: [\n")
    assert err.startswith("line 3: invalid YAML")


def test_every_problem_is_reported_at_once() -> None:
    errs = errors_of("models:\n  m:\n    source: x/y\n    want: always\n    wnat: 1\n")
    assert len(errs) == 2


@pytest.mark.parametrize(
    ("text", "n"), [("1024", 1024), ("1.5GiB", int(1.5 * 2**30)), ("64GB", 64 * 10**9)]
)
def test_sizes(text: str, n: int) -> None:
    assert parse_bytes(text) == n


@pytest.mark.parametrize(("text", "s"), [("90s", 90), ("30m", 1800), ("1h30m", 5400), (2.5, 2.5)])
def test_durations(text: str | float, s: float) -> None:
    assert parse_duration_s(text) == s
