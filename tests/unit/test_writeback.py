"""Writing a merge patch back into the user's YAML: where an added key goes among the comments,
which comments a deleted key takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmx.reconciler import manifest
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


MODELS = """# my models
models:
  # --- a: the first ---
  a:
    source: x
    engine:
      max_batch: 4
      # a's own note

  # --- b: DO NOT change its alias ---
  b:
    source: y   # b's line

  # --- c ---
  c:
    source: z
  # closing: an example
  # d: {source: w}
jit: true
"""


def test_a_deleted_model_takes_its_own_comments_and_leaves_the_next_ones() -> None:
    # `lmx set a --delete` took the comment block above b with it (ruamel keeps it with a).
    def without(*blocks: str) -> str:
        text = MODELS
        for block in blocks:
            assert block in text
            text = text.replace(block, "", 1)
        return text

    a = "  # --- a: the first ---\n  a:\n    source: x\n    engine:\n      max_batch: 4\n"
    a += "      # a's own note\n\n"
    assert _patched(MODELS, {"models": {"a": None}}) == without(a)
    b = "  # --- b: DO NOT change its alias ---\n  b:\n    source: y   # b's line\n\n"
    assert _patched(MODELS, {"models": {"b": None}}) == without(b)
    c = "  # --- c ---\n  c:\n    source: z\n"
    assert _patched(MODELS, {"models": {"c": None}}) == without(c)
    assert _patched(MODELS, {"models": {"a": None, "c": None}}) == without(a, c)


def test_deleting_every_model_leaves_models_empty_with_the_comments_around_them() -> None:
    # On the file lmx writes first, deleting lmx-tiny wrote `models:` with its comment, then `{}`
    # on a line of its own: invalid YAML, refused naming a line the user never wrote.
    out = _patched(DEFAULT, {"models": {"lmx-tiny": None}})
    manifest.parse(out, source="config.yaml")
    assert out.startswith(DEFAULT[: DEFAULT.index("models:")])  # the header, memory, jit, server
    example = DEFAULT[DEFAULT.index("  # A model from the Hugging Face Hub") :]
    assert out == DEFAULT[: DEFAULT.index("models:")] + "models: {}\n" + example
    everything = {"models": {"a": None, "b": None, "c": None}}
    assert _patched(MODELS, everything) == (
        "# my models\nmodels: {}\n  # closing: an example\n  # d: {source: w}\njit: true\n"
    )


def test_the_comments_after_a_deleted_last_model_follow_an_empty_list_ending_the_one_before() -> (
    None
):
    text = "models:\n  a:\n    aliases: []\n  # --- b ---\n  b:\n    want: pinned\n  # c: {}\n"
    assert _patched(text, {"models": {"b": None}}) == (
        "models:\n  a:\n    aliases: []\n  # c: {}\n"
    )


def test_a_key_merged_from_an_anchor_is_not_deleted_from_the_text() -> None:
    text = "x: &b {want: pinned}\nmodels:\n  a:\n    <<: *b\n    source: y\n"
    assert dump_tree(merge_patch(load_tree(text), {"models": {"a": {"want": None}}})) == text
