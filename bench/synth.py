"""Synthetic models for throughput: random weights in a real architecture's shape, offline.

`ensure_model(preset, models_dir)` returns a directory that `mlx_lm.load` and `lmx serve` accept.
`tiny` is lmx's built-in model; the others reuse its tokenizer, widened to the model's vocab with
one word per extra id, so every generated token decodes to visible text. Weights stream to disk tensor by
tensor from a small random pool, so an 8B model needs ~100 MB of RAM. Called by run_throughput.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tokenizers import Tokenizer

from lmx.runtime.builtin import BuiltinModel, ensure_builtin, model_config

FORMAT_VERSION = 3  # bump when the written files change: the cache directory name includes it
_POOL_SIZE = 4_194_319  # odd, so the rows of a (rows, 2^k) matrix do not repeat the pool's phase
_CHUNK_ELEMS = 1 << 22
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


# A preset is a built-in model's shape at real size (its seed is unused: weights come from _Pool).
Shape = BuiltinModel

PRESETS: dict[str, Shape] = {
    "qwen3-0.6b": Shape(
        model_type="qwen3",
        architecture="Qwen3ForCausalLM",
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        seed=0,
    ),
    "llama-3-8b": Shape(
        model_type="llama",
        architecture="LlamaForCausalLM",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_position_embeddings=8192,
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
        seed=0,
    ),
}
PRESET_NAMES = ("tiny", *PRESETS)
# safetensors dtype name and bytes per element.
DTYPES: dict[str, tuple[str, int]] = {
    "bfloat16": ("BF16", 2),
    "float16": ("F16", 2),
    "float32": ("F32", 4),
}


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    std: float | None  # None: a norm weight of ones
    head: bool = False  # the output projection: rows of unprintable tokens are zeroed

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def _tensors(s: Shape) -> list[_Tensor]:
    """Names as mlx_lm's qwen3/llama modules expect; linear std 1/sqrt(fan_in)."""
    h, q, kv, f = (
        s.hidden_size,
        s.num_attention_heads * s.head_dim,
        s.num_key_value_heads * s.head_dim,
        s.intermediate_size,
    )
    out = [_Tensor("model.embed_tokens.weight", (s.vocab_size, h), 0.02, s.tie_word_embeddings)]
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [
            _Tensor(p + "input_layernorm.weight", (h,), None),
            _Tensor(p + "post_attention_layernorm.weight", (h,), None),
            _Tensor(p + "self_attn.q_proj.weight", (q, h), h**-0.5),
            _Tensor(p + "self_attn.k_proj.weight", (kv, h), h**-0.5),
            _Tensor(p + "self_attn.v_proj.weight", (kv, h), h**-0.5),
            _Tensor(p + "self_attn.o_proj.weight", (h, q), q**-0.5),
        ]
        if s.model_type == "qwen3":
            out += [
                _Tensor(p + "self_attn.q_norm.weight", (s.head_dim,), None),
                _Tensor(p + "self_attn.k_norm.weight", (s.head_dim,), None),
            ]
        out += [
            _Tensor(p + "mlp.gate_proj.weight", (f, h), h**-0.5),
            _Tensor(p + "mlp.up_proj.weight", (f, h), h**-0.5),
            _Tensor(p + "mlp.down_proj.weight", (h, f), f**-0.5),
        ]
    out.append(_Tensor("model.norm.weight", (h,), None))
    if not s.tie_word_embeddings:
        out.append(_Tensor("lm_head.weight", (s.vocab_size, h), 0.02, head=True))
    return out


def printable_token_ids(model_dir: Path) -> list[int]:
    """Ids of the model's tokenizer that decode on their own to visible text.

    Prompts are drawn from these, and the synthetic models never generate the others, so that
    every generated token streams as its own text chunk (no held-back UTF-8 fragment or space).
    """
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    added = tok.get_added_tokens_decoder()
    ids = []
    for i in range(tok.get_vocab_size()):
        text = tok.decode([i])
        if i in added or not text.strip() or "\ufffd" in text:
            continue
        if all(c.isprintable() for c in text):
            ids.append(i)
    return ids


class _Pool:
    """A fixed-seed pool of N(0,1) values, encoded per (std, dtype) and read circularly."""

    def __init__(self, dtype: str, seed: int = 0) -> None:
        self._f32 = np.random.default_rng(seed).standard_normal(_POOL_SIZE, dtype=np.float32)
        self._dtype = dtype
        self._encoded: dict[float, np.ndarray] = {}

    def _encode(self, values: np.ndarray) -> np.ndarray:
        if self._dtype == "float32":
            return values.astype("<f4")
        if self._dtype == "float16":
            return values.astype("<f2").view("<u2")
        bits = values.astype("<f4").view("<u4")
        # float32 -> bfloat16, rounding to nearest even (the pool holds no NaN or inf).
        rounded: np.ndarray = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        return rounded

    def ones(self, n: int) -> np.ndarray:
        return self._encode(np.ones(n, dtype=np.float32))

    def encoded(self, std: float) -> np.ndarray:
        if std not in self._encoded:
            self._encoded[std] = self._encode(self._f32 * np.float32(std))
        return self._encoded[std]

    def chunks(self, std: float, start: int, n: int) -> Iterator[np.ndarray]:
        """`n` values beginning at pool offset `start`, wrapping around, in bounded chunks."""
        pool = self.encoded(std)
        pos, left = start % _POOL_SIZE, n
        while left:
            take = min(left, _POOL_SIZE - pos, _CHUNK_ELEMS)
            yield pool[pos : pos + take]
            left -= take
            pos = (pos + take) % _POOL_SIZE


def _write_tensor(
    f: BinaryIO, t: _Tensor, pool: _Pool, offset: int, keep_rows: np.ndarray | None
) -> None:
    if t.std is None:
        f.write(pool.ones(t.size).tobytes())
        return
    if not t.head or keep_rows is None:
        for chunk in pool.chunks(t.std, offset, t.size):
            f.write(chunk.tobytes())
        return
    # The tokenizer's rows, materialized to zero the unprintable ones; the rest stream as usual.
    cols, n_tok = t.shape[1], len(keep_rows)
    head = np.concatenate(list(pool.chunks(t.std, offset, n_tok * cols))).reshape(n_tok, cols)
    head[~keep_rows] = 0
    f.write(head.tobytes())
    for chunk in pool.chunks(t.std, offset + n_tok * cols, t.size - n_tok * cols):
        f.write(chunk.tobytes())


def _write_shard(
    path: Path,
    tensors: list[_Tensor],
    dtype: str,
    pool: _Pool,
    offsets: dict[str, int],
    keep_rows: np.ndarray,
) -> None:
    st_dtype, width = DTYPES[dtype]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for t in tensors:
        header[t.name] = {
            "dtype": st_dtype,
            "shape": list(t.shape),
            "data_offsets": [pos, pos + t.size * width],
        }
        pos += t.size * width
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            _write_tensor(f, t, pool, offsets[t.name], keep_rows)


def _widen_tokenizer(path: Path, vocab_size: int) -> None:
    """Give every id past the tokenizer's own a word (" w12345"), so each generated token streams
    visible text, as a real model's would (an id without a token decodes to nothing)."""
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    n = Tokenizer.from_str(json.dumps(data)).get_vocab_size()
    vocab.update({f"\u0120w{i}": i for i in range(n, vocab_size)})  # \u0120 is byte-level " "
    path.write_text(json.dumps(data, ensure_ascii=False))


def build(preset: str, dest: Path, tokenizer_dir: Path, dtype: str, shard_bytes: int) -> Path:
    """Write the synthetic `preset` into `dest` (an empty or new directory)."""
    shape = PRESETS[preset]
    tensors = _tensors(shape)
    width = DTYPES[dtype][1]
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.size * width > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.size * width
    total = sum(t.size for t in tensors) * width
    dest.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest).free
    if free < total * 1.02:
        raise OSError(f"{preset} needs {total / 1e9:.1f} GB in {dest}; {free / 1e9:.1f} GB free")

    rng = np.random.default_rng(FORMAT_VERSION)
    offsets = {t.name: int(rng.integers(_POOL_SIZE)) for t in tensors}
    n_tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    keep = np.zeros(min(n_tok, shape.vocab_size), bool)
    keep[[i for i in printable_token_ids(tokenizer_dir) if i < len(keep)]] = True
    pool = _Pool(dtype)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(dest / name, shard, dtype, pool, offsets, keep)
        weight_map.update({t.name: name for t in shard})

    for name in _TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, dest / name)
    _widen_tokenizer(dest / "tokenizer.json", shape.vocab_size)
    tok_config = json.loads((dest / "tokenizer_config.json").read_text())
    tok_config["model_max_length"] = shape.max_position_embeddings
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    base = json.loads((tokenizer_dir / "config.json").read_text())
    config = model_config(shape, int(base["eos_token_id"]), int(base["pad_token_id"]), dtype)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest


def ensure_model(
    preset: str, models_dir: Path, dtype: str = "bfloat16", shard_bytes: int = 2 << 30
) -> Path:
    """The directory of `preset`, built on first use and cached under `models_dir`.

    A build happens in a private temporary directory renamed into place when complete, so a
    directory that exists is whole. `tiny` is lmx's built-in model (float32, `dtype` ignored).
    """
    models_dir = Path(models_dir).resolve()
    tokenizer_dir = ensure_builtin("tiny", models_dir / "builtin")
    if preset == "tiny":
        return tokenizer_dir
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESET_NAMES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    final = models_dir / f"{preset}-{dtype}-v{FORMAT_VERSION}"
    if (final / "config.json").is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{preset}-", suffix=".tmp", dir=models_dir))
    try:
        build(preset, tmp, tokenizer_dir, dtype, shard_bytes)
        tmp.chmod(0o755)
        tmp.replace(final)
    except OSError:
        if not (final / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build a synthetic model for throughput benchmarks.")
    p.add_argument("--preset", choices=PRESET_NAMES, default="tiny")
    p.add_argument("--models-dir", type=Path, default=Path("bench/.models"))
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--shard-gb", type=float, default=2.0, help="bytes per shard, in GiB")
    args = p.parse_args(argv)
    print(ensure_model(args.preset, args.models_dir, args.dtype, int(args.shard_gb * 2**30)))


if __name__ == "__main__":
    main()
