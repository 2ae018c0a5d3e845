"""Built-in tiny models: real architectures (Qwen3, Llama) with random weights and a real BPE.

`build_model` writes a directory that `mlx_lm.load` accepts, offline and byte-for-byte
deterministic; `ensure_builtin` caches one build per content hash. Tests, `lmx make-model` and
benchmarks call these. This module must not import mlx: weights are written with numpy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import tokenizers
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# As in Qwen3: the markup tokens are added tokens but not special, so that decoding with
# skip_special_tokens=True keeps them in the text where tool-call and reasoning parsers look.
MARKUP_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")
SPECIAL_TOKENS = (PAD_TOKEN, "<|im_start|>", EOS_TOKEN, *MARKUP_TOKENS)
# What `build_model` writes: a model missing any of them does not load.
BUILT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
)


@dataclass(frozen=True)
class BuiltinModel:
    """The shape of one built-in model; `vocab_size` is also the BPE training target."""

    model_type: str
    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    seed: int


BUILTIN_MODELS: Mapping[str, BuiltinModel] = MappingProxyType(
    {
        "tiny": BuiltinModel(
            model_type="qwen3",
            architecture="Qwen3ForCausalLM",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            vocab_size=2048,
            tie_word_embeddings=True,
            max_position_embeddings=4096,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            seed=0,
        ),
        "tiny-llama": BuiltinModel(
            model_type="llama",
            architecture="LlamaForCausalLM",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            vocab_size=1024,
            tie_word_embeddings=False,
            max_position_embeddings=4096,
            rope_theta=10_000.0,
            rms_norm_eps=1e-5,
            seed=1,
        ),
    }
)


def _data_text(name: str) -> str:
    return (resources.files("lmx.runtime") / "data" / name).read_text(encoding="utf-8")


def _spec(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise ValueError(f"unknown built-in model {name!r}; known: {known}") from None


@contextlib.contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    # tokenizers reads this on each call; one thread keeps BPE training order-independent.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with _single_threaded_tokenizers():
        tok.train_from_iterator(_data_text("corpus.txt").splitlines(keepends=True), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"corpus too small for {vocab_size} tokens: {tok.get_vocab_size()}")
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] not in MARKUP_TOKENS
    return Tokenizer.from_str(json.dumps(data))


def _unprintable_ids(tok: Tokenizer) -> list[int]:
    """Added tokens, lone UTF-8 fragments and control characters other than newline and tab."""
    added = tok.get_added_tokens_decoder()

    def printable(text: str) -> bool:
        return "\ufffd" not in text and all(c in "\n\t" or c.isprintable() for c in text)

    n = tok.get_vocab_size()
    return [i for i in range(n) if i in added or not printable(tok.decode([i]))]


def _weights(spec: BuiltinModel, suppressed_ids: list[int]) -> dict[str, np.ndarray]:
    """Random weights named as mlx_lm's qwen3/llama modules expect, from a fixed seed."""
    rng = np.random.default_rng(spec.seed)
    h, kv = spec.hidden_size, spec.num_key_value_heads * spec.head_dim
    q = spec.num_attention_heads * spec.head_dim

    def normal(rows: int, cols: int, std: float | None = None) -> np.ndarray:
        # Linear layers get std 1/sqrt(fan_in) so that they, not the residual copy of the last
        # token's embedding, decide the output: greedy text then varies with the context.
        scale = np.float32(std if std is not None else cols**-0.5)
        return (rng.standard_normal((rows, cols), dtype=np.float32) * scale).astype("<f4")

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype="<f4")

    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(spec.vocab_size, h, 0.02)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = ones(h)
        out[p + "post_attention_layernorm.weight"] = ones(h)
        out[p + "self_attn.q_proj.weight"] = normal(q, h)
        out[p + "self_attn.k_proj.weight"] = normal(kv, h)
        out[p + "self_attn.v_proj.weight"] = normal(kv, h)
        out[p + "self_attn.o_proj.weight"] = normal(h, q)
        if spec.model_type == "qwen3":
            out[p + "self_attn.q_norm.weight"] = ones(spec.head_dim)
            out[p + "self_attn.k_norm.weight"] = ones(spec.head_dim)
        out[p + "mlp.gate_proj.weight"] = normal(spec.intermediate_size, h)
        out[p + "mlp.up_proj.weight"] = normal(spec.intermediate_size, h)
        out[p + "mlp.down_proj.weight"] = normal(h, spec.intermediate_size)
    out["model.norm.weight"] = ones(h)
    head = "model.embed_tokens.weight"
    if not spec.tie_word_embeddings:
        head = "lm_head.weight"
        out[head] = normal(spec.vocab_size, h, 0.02)
    # A zero row gives a logit of exactly 0, below the best random one: greedy text is printable
    # and never ends on EOS, so greedy runs stop at max_tokens or a stop string.
    out[head][suppressed_ids] = 0.0
    return out


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def model_config(
    spec: BuiltinModel, eos_token_id: int | None, pad_token_id: int | None, dtype: str
) -> dict[str, Any]:
    """The `config.json` of a model of `spec`'s shape (also used by bench/ for real-size shapes)."""
    return {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": spec.vocab_size,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": dtype,
    }


def build_model(name: str, dest: Path) -> Path:
    """Write the built-in model `name` into `dest` (created if missing) and return `dest`.

    Deterministic: two builds give byte-identical files. Raises ValueError for an unknown name.
    """
    spec = _spec(name)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(spec.vocab_size)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    eos_id, pad_id = ids[EOS_TOKEN], ids[PAD_TOKEN]

    save_file(
        _weights(spec, _unprintable_ids(tok)), str(dest / "model.safetensors"), {"format": "pt"}
    )
    tok.save(str(dest / "tokenizer.json"))
    _write_json(dest / "config.json", model_config(spec, eos_id, pad_id, "float32"))
    _write_json(
        dest / "generation_config.json",
        {"eos_token_id": eos_id, "pad_token_id": pad_id, "do_sample": False},
    )
    _write_json(
        dest / "special_tokens_map.json",
        {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "additional_special_tokens": []},
    )
    _write_json(
        dest / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": {
                str(i): {
                    "content": t,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": t not in MARKUP_TOKENS,
                }
                for t, i in ids.items()
            },
            "bos_token": None,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "clean_up_tokenization_spaces": False,
            "model_max_length": spec.max_position_embeddings,
            "chat_template": _data_text("chat_template.jinja"),
        },
    )
    return dest


def builtin_digest(name: str) -> str:
    """A short hash of everything a build of `name` depends on; names its cache directory."""
    h = hashlib.sha256()
    parts = [
        json.dumps(asdict(_spec(name)), sort_keys=True),
        f"numpy {np.__version__} tokenizers {tokenizers.__version__}",
        Path(__file__).read_text(encoding="utf-8"),  # any change to the builder rebuilds
        _data_text("corpus.txt"),
        _data_text("chat_template.jinja"),
    ]
    for part in parts:
        h.update(part.encode("utf-8") + b"\0")
    return h.hexdigest()[:12]


def is_built(path: Path) -> bool:
    """Whether `path` holds every file of a build. Never raises."""
    return all((path / f).is_file() for f in BUILT_FILES)


def ensure_builtin(name: str, cache_dir: Path) -> Path:
    """Return `cache_dir/<name>-<digest>`, building it first if absent.

    Idempotent and safe across racing processes: each builds in a private temporary directory
    beside the target and renames it into place; a loser of the race discards its copy.
    """
    cache_dir = Path(cache_dir)
    final = cache_dir / f"{name}-{builtin_digest(name)}"
    if is_built(final):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".tmp", dir=cache_dir))
    try:
        tmp.chmod(0o755)
        build_model(name, tmp)
        if final.exists() and not is_built(final):  # part of it, left by a cut delete of old
            stale = Path(tempfile.mkdtemp(prefix=f".{name}-", suffix=".stale", dir=cache_dir))
            with contextlib.suppress(OSError):  # another process moved it first
                final.replace(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.replace(final)
    except OSError:
        # Renaming onto a non-empty directory fails: another process finished first.
        if not is_built(final):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
