"""The desired-state schema: valid files parse; bad ones fail naming the field path and the line."""

from __future__ import annotations

import pytest

from lmx.errors import ConfigError
from lmx.reconciler.manifest import locate, parse
from lmx.reconciler.spec import REDACTED, Want, parse_bytes, parse_duration_s, redact


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


@pytest.mark.parametrize("text", ["", "  \n\n", "# all models commented out\n#models:\n", "---\n"])
def test_a_file_with_nothing_in_it_is_invalid_not_no_models(text: str) -> None:
    # An editor's truncate-then-write read half way must not unload every model, pins too.
    (err,) = errors_of(text)
    assert err.startswith("(root): the file is empty") and "`models: {}`" in err


def test_no_models_is_declared_explicitly() -> None:
    assert parse("models: {}\n").models == {}
    assert parse("models:\n").models == {}
    assert parse("# nothing yet\njit: true\n").models == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "models:\n  a: {source: x/y}\n  b: {source: x/z}\n  a: {source: x/w}\n",
            "models.a (line 4): duplicate key (first at line 2)",
        ),
        ("jit: true\nmemory: {budget: 1GiB}\njit: false\n", "jit (line 3): duplicate key"),
        (
            "models:\n  a:\n    source: x/y\n    want: pinned\n    want: absent\n",
            "models.a.want (line 5): duplicate key (first at line 4)",
        ),
        ("server:\n  api_keys:\n    - {k: 1, k: 2}\n", "server.api_keys.0.k (line 3): duplicate"),
    ],
)
def test_duplicate_keys_anywhere_are_named_with_their_line(text: str, expected: str) -> None:
    (err,) = errors_of(text)
    assert err.startswith(expected), err


def test_budget_errors_get_the_line_of_their_field() -> None:
    text = "models:\n  qwen2.5:\n    source: x/y\n    want: pinned\n"
    errors = ["models.qwen2.5.want: the pinned models need 9 GiB", "(root): other"]
    assert locate(errors, text) == [
        "models.qwen2.5.want (line 4): the pinned models need 9 GiB",
        "(root): other",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server: {admin_key: <redacted>}\n", "server.admin_key (line 1): '<redacted>' stands"),
        ("server:\n  api_keys: [k1, <redacted>]\n", "server.api_keys.1 (line 2): '<redacted>'"),
    ],
)
def test_the_redaction_marker_is_never_a_key(text: str, expected: str) -> None:
    (err,) = errors_of(text)
    assert err.startswith(expected), err


def test_redact_hides_every_secret_and_keeps_the_count() -> None:
    data = {"server": {"admin_key": "a", "api_keys": ["k1", "k2"], "cors_origins": ["x"]}}
    assert redact(data) == {
        "server": {"admin_key": REDACTED, "api_keys": [REDACTED] * 2, "cors_origins": ["x"]}
    }
    assert data["server"]["admin_key"] == "a"  # a copy
    assert redact({"server": {"admin_key": None}}) == {"server": {"admin_key": None}}
    assert redact({"server": "bogus"}) == {"server": "bogus"}
    assert redact({"server": {"api_keys": "k"}}) == {"server": {"api_keys": REDACTED}}


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
        ("memory: {budget: 0GiB}\n", "memory.budget (line 1): must be a positive number of bytes"),
        ("memory: {budget: 0}\n", "memory.budget (line 1): must be a positive number of bytes"),
        (
            "memory: {budget: abc%}\n",
            "memory.budget (line 1): 'abc%' is not a budget; use a percentage of memory like 90%,"
            " or a size like 400GiB",
        ),
        (
            "models:\n  m: {source: x/y, idle_ttl: soon}\n",
            "models.m.idle_ttl (line 2): 'soon' is not a duration",
        ),
        (
            "models:\n  m: {source: x/y, idle_ttl: 0m0s}\n",
            "models.m.idle_ttl (line 2): must be a positive number of seconds",
        ),
        ("models:\n  m: {want: pinned}\n", "models.m.source (line 2): Field required"),
        (
            "models:\n  m:\n    source: x/y\n    engine:\n      tool_parser: qwen3coder\n",
            "models.m.engine.tool_parser (line 5): unknown tool parser 'qwen3coder';"
            " known: glm, harmony, hermes, llama3, mistral, none, qwen3_coder",
        ),
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


@pytest.mark.parametrize(
    "zero",
    [0, 0.0, "0s", "0m0s", "0ms", "0h 0m", float("nan")],  # NaN: no number of seconds either
)
def test_a_zero_duration_is_refused_however_it_is_written(zero: str | float) -> None:
    with pytest.raises(ValueError, match=r"^must be a positive number of seconds$"):
        parse_duration_s(zero)
