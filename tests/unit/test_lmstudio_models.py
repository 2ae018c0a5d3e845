"""A model as LM Studio's /api/v0/models lists it (lmx.api.lmstudio.model_entry), from its files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmx.api.lmstudio import model_entry
from lmx.reconciler.status import Listed


def _model(path: Path, config: dict[str, Any], template: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if template is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return path


def test_entries_tell_kind_quantization_state_and_context_from_the_files(tmp_path: Path) -> None:
    quantized = _model(
        tmp_path / "q",
        {"model_type": "qwen3", "quantization": {"bits": 4}, "max_position_embeddings": 40960},
        "{% if tools %}{{ tools | tojson }}{% endif %}{{ messages }}",
    )
    entry = model_entry(
        Listed("coder", "qwen", "mlx-community/Qwen3-8B-4bit", quantized, "loaded", 8192)
    )
    assert entry == {
        "id": "coder",
        "object": "model",
        "type": "llm",
        "publisher": "mlx-community",
        "arch": "qwen3",
        "compatibility_type": "mlx",
        "quantization": "4bit",
        "state": "loaded",
        "max_context_length": 40960,
        "loaded_context_length": 8192,
        "capabilities": ["tool_use"],
    }
    # Not loaded: no loaded context; a template without tools: no tool use; its weights' type.
    plain = _model(tmp_path / "p", {"model_type": "llama", "torch_dtype": "bfloat16"}, "{{ x }}")
    entry = model_entry(Listed("p", "p", "/models/p", plain, "not-loaded", None))
    assert (entry["publisher"], entry["quantization"], entry["state"]) == (
        "local",
        "bf16",
        "not-loaded",
    )
    assert entry["capabilities"] == [] and "loaded_context_length" not in entry
    assert entry["max_context_length"] is None  # neither the files nor the spec say
    # A sentence-transformers pipeline is an embedding model.
    (plain / "modules.json").write_text("[]")
    assert model_entry(Listed("p", "p", "/models/p", plain, "loading", 512))["type"] == "embeddings"


def test_an_entry_follows_its_files_when_they_change(tmp_path: Path) -> None:
    path = _model(tmp_path / "m", {"model_type": "qwen3"})
    listed = Listed("m", "m", "builtin:tiny", path, "loaded", 4096)
    assert model_entry(listed)["arch"] == "qwen3"
    _model(path, {"model_type": "llama"})
    later = (path / "config.json").stat().st_mtime + 5
    os.utime(path / "config.json", (later, later))
    assert model_entry(listed)["arch"] == "llama"
    assert model_entry(listed)["publisher"] == "lmx"
