"""The built-in tiny models: deterministic builds that mlx_lm loads, templates and generates with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from lmx.runtime import builtin
from lmx.runtime.builtin import BUILTIN_MODELS, build_model, ensure_builtin

FILES = builtin.BUILT_FILES  # what a build writes, and what the store requires of one
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("builtin")
    return {name: build_model(name, root / name) for name in BUILTIN_MODELS}


@pytest.fixture(scope="module")
def tiny_tokenizer(built: dict[str, Path]) -> Any:
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(built["tiny"])


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_two_builds_write_byte_identical_files(
    name: str, built: dict[str, Path], tmp_path: Path
) -> None:
    again = build_model(name, tmp_path / "again")
    assert {p.name for p in again.iterdir()} == FILES
    for file in sorted(FILES):
        assert (again / file).read_bytes() == (built[name] / file).read_bytes(), file


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_config_names_the_tokenizer_vocab_and_eos(name: str, built: dict[str, Path]) -> None:
    config = json.loads((built[name] / "config.json").read_text())
    generation = json.loads((built[name] / "generation_config.json").read_text())
    tok = Tokenizer.from_file(str(built[name] / "tokenizer.json"))
    assert config["model_type"] == BUILTIN_MODELS[name].model_type
    assert config["vocab_size"] == tok.get_vocab_size()
    assert config["eos_token_id"] == generation["eos_token_id"] == tok.token_to_id("<|im_end|>")


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_mlx_lm_loads_the_build_and_greedy_generation_gives_printable_text(
    name: str, built: dict[str, Path]
) -> None:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tok = mlx_lm.load(str(built[name]))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the weather in Paris?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    text = mlx_lm.generate(model, tok, prompt, max_tokens=8, sampler=make_sampler(temp=0.0))
    assert text.strip()
    assert "\ufffd" not in text
    assert tok.eos_token_ids == {tok.convert_tokens_to_ids("<|im_end|>")}


def test_chat_template_renders_every_role_tool_calls_and_tools(tiny_tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 18}'},
        {"role": "assistant", "content": "It is 18 degrees."},
    ]
    text = tiny_tokenizer.apply_chat_template(
        messages, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert json.dumps(TOOLS[0]) in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>\n'
    ) in text
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 18}\n</tool_response>' in text
    assert "<|im_start|>assistant\nIt is 18 degrees.<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_template_without_tools_or_generation_prompt(tiny_tokenizer: Any) -> None:
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=False, tokenize=False
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n"


def test_mlx_lm_infers_the_json_tool_parser(tiny_tokenizer: Any) -> None:
    assert tiny_tokenizer.has_tool_calling
    assert tiny_tokenizer.tool_call_start == "<tool_call>"
    assert tiny_tokenizer.tool_call_end == "</tool_call>"


def test_tokenizer_round_trips_text_and_keeps_markup_tokens(tiny_tokenizer: Any) -> None:
    sample = 'Hello, wörld! 🙂 {"a": [1, 2.5]}\n\tdef f(x): return x  '
    ids = tiny_tokenizer.encode(sample, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == sample
    marked = "<think>hm</think><tool_call>{}</tool_call><|im_end|>"
    ids = tiny_tokenizer.encode(marked, add_special_tokens=False)
    assert tiny_tokenizer.convert_tokens_to_ids("<tool_call>") in ids
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == marked.removesuffix("<|im_end|>")


def test_unknown_model_name_raises_value_error_naming_it_and_the_known_ones(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"'huge'.*tiny, tiny-llama"):
        build_model("huge", tmp_path)
    with pytest.raises(ValueError, match="'huge'"):
        ensure_builtin("huge", tmp_path)


def test_ensure_builtin_builds_once_and_reuses_the_directory(tmp_path: Path) -> None:
    first = ensure_builtin("tiny", tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = ensure_builtin("tiny", tmp_path)
    assert second == first
    assert first.parent == tmp_path and first.name.startswith("tiny-")
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert {p.name for p in first.iterdir()} == FILES
    assert list(tmp_path.iterdir()) == [first]


def test_ensure_builtin_keeps_the_winner_when_another_process_finishes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = builtin.build_model
    final = tmp_path / f"tiny-{builtin.builtin_digest('tiny')}"

    def racing_build(name: str, dest: Path) -> Path:
        real_build(name, final)  # the other process renames its copy into place first
        return real_build(name, dest)

    monkeypatch.setattr(builtin, "build_model", racing_build)
    assert ensure_builtin("tiny", tmp_path) == final
    assert list(tmp_path.iterdir()) == [final]
