"""The built-in tiny model as a harmony model (gpt-oss's format), for tests of the worker and the
API on a real tokenizer: its added tokens renamed as harmony's markup, ids and weights unchanged
(the random weights never write them, so only a grammar or the worker does)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HARMONY_NAMES = {
    "<|im_start|>": "<|start|>",
    "<|im_end|>": "<|return|>",
    "<think>": "<|channel|>",
    "</think>": "<|message|>",
    "<tool_call>": "<|end|>",
    "</tool_call>": "<|call|>",
}


def harmony_model(tiny_model_dir: Path, dest: Path) -> Path:
    """A copy of the tiny model whose tokenizer writes harmony's markup, all of it special."""
    shutil.copytree(tiny_model_dir, dest)
    tok = json.loads((dest / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        added["content"] = HARMONY_NAMES.get(added["content"], added["content"])
        added["special"] = True
    vocab = tok["model"]["vocab"]
    tok["model"]["vocab"] = {HARMONY_NAMES.get(t, t): i for t, i in vocab.items()}
    (dest / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((dest / "tokenizer_config.json").read_text())
    for added in config["added_tokens_decoder"].values():
        added["content"] = HARMONY_NAMES.get(added["content"], added["content"])
        added["special"] = True
    config["eos_token"] = "<|return|>"
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    (dest / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|return|>", "pad_token": "<|endoftext|>"})
    )
    return dest
