"""Writing a merge patch back into the user's YAML: where an added key goes among the comments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmx.reconciler.writeback import dump_tree, load_tree, merge_patch

DEFAULT = (Path(__file__).parents[2] / "lmx" / "manifests" / "default.yaml").read_text()


def _patched(text: str, patch: dict[str, Any]) -> str:
    out = dump_tree(merge_patch(load_tree(text), patch))
    data = yaml.safe_load(text)
    assert yaml.safe_load(out) == _merged(data, patch)
    return out


def _merged(data: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    out = dict(data) if isinstance(data, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(out.get(key), value)
    return out


def test_a_key_added_to_the_last_model_goes_ahead_of_the_commented_out_example_after_it() -> None:
    # `lmx set lmx-tiny sampling.temperature=0.5` on the file lmx writes first: the new key was
    # written after the example, as if it were part of it (uncommenting it would take it over).
    for patch, added in (
        ({"sampling": {"temperature": 0.5}}, "    sampling:\n      temperature: 0.5\n"),
        ({"sampling": {"stop": ["a"]}}, "    sampling:\n      stop:\n        - a\n"),
        ({"idle_ttl": "1h"}, "    idle_ttl: 1h\n"),
    ):
        out = _patched(DEFAULT, {"models": {"lmx-tiny": patch}})
        engine_notes = "      #                      # hermes, qwen3_coder, glm, llama3, mistral"
        example = "\n  # A model from the Hugging Face Hub, fetched on demand:\n  # qwen3-8b:\n"
        assert out.index(engine_notes) < out.index(added) < out.index(example)
        assert out.endswith(
            "  #                                 # generation_config.json; no "
            "reload when changed)\n"
        )


def test_only_the_comment_lines_left_of_the_mapping_keys_move_after_an_added_key() -> None:
    text = "a:\n  b:\n    - x\n    - y   # the last\n  # about a's keys\n\n# about the file\n"
    assert _patched(text, {"a": {"c": 1}}) == (
        "a:\n  b:\n    - x\n    - y   # the last\n  # about a's keys\n  c: 1\n\n# about the file\n"
    )
    # A new model goes after the models' own closing comments (a model commented out), at their
    # level; the end-of-line comment stays on its line.
    models = "models:\n  m:\n    want: pinned  # never evicted\n  # n:\n  #   want: resident\n"
    assert _patched(models, {"models": {"o": {"want": "downloaded"}}}) == (
        models + "  o:\n    want: downloaded\n"
    )


def test_a_list_replacing_one_is_written_as_it_was() -> None:
    # Its comment keeps its column.
    text = "m:\n  aliases: [a, b]   # what clients may call it\n  stop:\n    - x\n"
    assert _patched(text, {"m": {"aliases": ["c"], "stop": ["y", "z"]}}) == (
        "m:\n  aliases: [c]      # what clients may call it\n  stop:\n    - y\n    - z\n"
    )
