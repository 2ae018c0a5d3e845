"""The model store: where each model's files live under LMX_HOME, and how much memory it needs.

Sources: `builtin:NAME` (built offline into LMX_HOME/builtin/), a local directory (used as is) or
a Hub repo (downloaded into LMX_HOME/models/<org>--<name>/ by `downloads.py`). Footprints are
estimated from safetensors headers and config.json, and replaced by measured numbers kept in
LMX_HOME/footprints.json. Called by the reconciler on worker threads: everything here may block.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from lmx.errors import PermanentError
from lmx.runtime import builtin, downloads
from lmx.runtime.downloads import ProgressEvent, RepoSnapshot
from lmx.runtime.files import write_atomic

log = structlog.get_logger(__name__)

Builder = Callable[[str, Path], Path]

# Reserved on top of weights, KV and prompt cache: activations during prefill, MLX's temporaries.
MARGIN_RATIO = 0.05
MARGIN_MIN_BYTES = 32 * 2**20
_DTYPE_BYTES = {"float32": 4, "float64": 8}  # others (bf16, f16, quantized models' KV): 2
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class Sizing:
    """The load parameters that size a model's memory (from its spec's `engine`)."""

    context_length: int | None
    max_batch: int
    prompt_cache_bytes: int
    prefill_step: int = 2048  # prompt tokens a forward pass takes at most


# A sentence-transformers pipeline's file: its model embeds and writes no text.
EMBEDDING_MARKER = "modules.json"


def is_local_source(source: str) -> bool:
    """A model source that is a directory of the user's (a path, or `file:` one), not a Hub
    repo or a built-in model."""
    return source.startswith(("/", "~", "./", "../", "file:"))


def is_embedding_model(path: Path) -> bool:
    """The model is published as a sentence-transformers pipeline (`modules.json`): an embedding
    model, whose language-model head, where it has one, was never trained to write text."""
    return (path / EMBEDDING_MARKER).is_file()


# How a load's footprint is measured, kept with each measurement. 2: the whole worker, idle spare
# workers left out (lmx.runtime.memory). Before, a load that started its own worker was charged
# the spare as well, and one that took a spare was charged none of it: a model measured too big
# could be refused for good, never loaded again to be measured anew.
MEASURE = 2


@dataclass(frozen=True)
class Footprint:
    """Memory one loaded model is charged: weights + KV at full context and batch + margin, plus
    the engine's own process until a load measured it all."""

    weights_bytes: int
    kv_bytes: int
    prompt_cache_bytes: int
    margin_bytes: int
    measured: bool = False  # weights_bytes is what a load really took, not an estimate
    context_tokens: int = 0  # per sequence, as reserved
    process_bytes: int = 0  # the engine's process besides the model (interpreter, MLX, tokenizer)

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.kv_bytes
            + self.prompt_cache_bytes
            + self.margin_bytes
            + self.process_bytes
        )

    def measured_as(self, weights_bytes: int) -> Footprint:
        """With what a load took (the worker process included) in place of the estimate."""
        margin = _margin(weights_bytes + self.kv_bytes)
        return dataclasses.replace(
            self, weights_bytes=weights_bytes, margin_bytes=margin, measured=True, process_bytes=0
        )


def _margin(n: int) -> int:
    return max(MARGIN_MIN_BYTES, int(n * MARGIN_RATIO))


def safetensors_weight_bytes(path: Path) -> int:
    """Tensor bytes in one safetensors file, from its JSON header only (8-byte length + JSON)."""
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: safetensors header of {n} bytes")
        header = json.loads(fh.read(n))
    return sum(
        int(t["data_offsets"][1]) - int(t["data_offsets"][0])
        for name, t in header.items()
        if name != "__metadata__"
    )


def kv_bytes_per_token(config: dict[str, Any]) -> int | None:
    """K and V bytes one token takes across all layers, from config.json; None if unknown."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    assert isinstance(cfg, dict)
    try:
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or "")
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 2)


def named_json_error(exc: Exception, model_dir: Path) -> Exception:
    """`exc`, or, where it is a JSON file of `model_dir` that does not parse (the parser's error
    names no file), an error naming that file."""
    if not isinstance(exc, json.JSONDecodeError):
        return exc
    for f in sorted(model_dir.glob("*.json")):
        try:
            json.loads(f.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as bad:
            return ValueError(f"{f} is not valid JSON: {bad}")
    return exc


def context_tokens(config: dict[str, Any], declared: int | None) -> int:
    """Tokens per sequence a load reserves: the declared length, capped at the model's native one
    (from config.json, or its `text_config` for multimodal models; 4096 if it names none)."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    assert isinstance(cfg, dict)
    native = int(cfg.get("max_position_embeddings") or cfg.get("max_seq_len") or 4096)
    return min(native, declared or native)


def estimate(
    weights_bytes: int,
    config: dict[str, Any],
    sizing: Sizing,
    process_bytes: int = 0,
    *,
    embedding_only: bool = False,
) -> Footprint:
    """The footprint before any load. Context: the declared length, else the model's native one
    (as the engine does); KV for `max_batch` sequences of that length. An embedding-only model
    generates nothing: its KV is that of one batch of rows (a prefill chunk padded, or one row of
    the whole context), and it keeps no prompt cache."""
    tokens = context_tokens(config, sizing.context_length)
    positions = max(tokens, sizing.prefill_step) if embedding_only else tokens * sizing.max_batch
    kv = (kv_bytes_per_token(config) or 0) * positions
    return Footprint(
        weights_bytes=weights_bytes,
        kv_bytes=kv,
        prompt_cache_bytes=0 if embedding_only else sizing.prompt_cache_bytes,
        margin_bytes=_margin(weights_bytes + kv),
        context_tokens=tokens,
        process_bytes=process_bytes,
    )


class ModelStore:
    """Resolves sources to directories, fetches them, and keeps footprints. Thread-safe."""

    def __init__(
        self,
        home: Path,
        *,
        base_dir: Path | None = None,
        token: str | None = None,
        build: Builder = builtin.ensure_builtin,
        disk_free: Callable[[Path], int] = downloads.free_bytes,
        engine_process_bytes: int = 0,
    ) -> None:
        self.home = Path(home)
        # What one engine's process takes besides its model; part of every estimate.
        self._process_bytes = engine_process_bytes
        self._base_dir = base_dir  # relative local sources are relative to the config file
        self._token = token
        self._build = build
        self._disk_free = disk_free  # free bytes at a path; injectable to simulate a small disk
        self._lock = threading.Lock()
        self._digests: dict[str, str] = {}
        self._estimates: dict[tuple[str, str], Footprint] = {}
        self._disk_cache: dict[tuple[Path, Sizing], tuple[object, Footprint | None]] = {}
        self._measured: dict[str, dict[str, Any]] | None = None

    # -- where files live --

    def locate(self, source: str, revision: str = "main") -> Path:
        """The directory a source's files are (or will be) in. No download, no build."""
        if source.startswith("builtin:"):
            name = source.removeprefix("builtin:")
            with self._lock:
                if name not in self._digests:
                    self._digests[name] = builtin.builtin_digest(name)
                digest = self._digests[name]
            return self.home / "builtin" / f"{name}-{digest}"
        if is_local_source(source):
            path = Path(source.removeprefix("file:")).expanduser()
            return path if path.is_absolute() or self._base_dir is None else self._base_dir / path
        # `main` follows the branch in place; any other revision gets a directory of its own, so
        # two models of one repo at different revisions never overwrite each other's files.
        name = source.replace("/", "--")
        if revision != "main":
            name += "@" + re.sub(r"[^A-Za-z0-9._-]", "_", revision)
        return self.home / "models" / name

    def is_downloaded(self, source: str, revision: str = "main") -> bool:
        """Whether the files for `source` at `revision` are complete on disk. Never raises."""
        try:
            path = self.locate(source, revision)
        except ValueError:  # an unknown built-in name
            return False
        if source.startswith("builtin:"):
            return builtin.is_built(path)
        if is_local_source(source):
            return (path / "config.json").is_file()
        return self.downloaded_commit(source, revision) is not None

    def downloaded_commit(self, source: str, revision: str = "main") -> str | None:
        """The commit a Hub source's complete download at `revision` is pinned to, else None.
        Never raises."""
        if source.startswith("builtin:") or is_local_source(source):
            return None
        path = self.locate(source, revision)
        manifest = downloads.read_manifest(path)
        if manifest is None or not (
            manifest.revision == revision or manifest.commit.startswith(revision)
        ):
            return None
        return manifest.commit if downloads.is_complete(path, manifest) else None

    def on_disk(self, source: str, revision: str = "main") -> bool:
        """Whether lmx holds files of its own for this source (complete or partial); files a
        person put beside them do not count, since `delete` leaves those."""
        if is_local_source(source):
            return False
        try:
            path = self.locate(source, revision)
        except ValueError:
            return False
        if source.startswith("builtin:"):
            return path.exists()
        return (path / downloads.MANIFEST_NAME).exists() or (path / downloads.PARTIAL_DIR).exists()

    # -- fetching and deleting (blocking) --

    def resolve(self, source: str, revision: str) -> RepoSnapshot:
        """Pin a Hub revision to a commit and list its files. Raises a DownloadError."""
        return downloads.resolve(source, revision, token=self._token)

    def check_disk(self, snapshot: RepoSnapshot) -> int:
        """Raise InsufficientDisk unless the disk holds what is left to fetch of `snapshot` (plus
        a margin); return those bytes. Fetches nothing."""
        path = self.locate(snapshot.repo_id, snapshot.revision)
        return downloads.check_disk(snapshot, path, disk_free=self._disk_free)

    def fetch(
        self,
        source: str,
        revision: str,
        *,
        snapshot: RepoSnapshot | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Path:
        """Make the source's files complete on disk and return their directory. Idempotent."""
        if source.startswith("builtin:"):
            try:
                return self._build(source.removeprefix("builtin:"), self.home / "builtin")
            except ValueError as exc:
                raise PermanentError(str(exc)) from None
        path = self.locate(source, revision)
        if is_local_source(source):
            if not (path / "config.json").is_file():
                raise PermanentError(f"no model at {path} (config.json missing)")
            return path
        snap = snapshot or self.resolve(source, revision)
        downloads.download(
            snap, path, token=self._token, on_progress=on_progress, cancel=cancel,
            disk_free=self._disk_free,
        )  # fmt: skip
        return path

    def delete(self, source: str, revision: str = "main") -> int:
        """Remove what lmx downloaded or built for `source`; never a local directory. Bytes freed.

        Crash-safe: the directory is first renamed aside (one step), so that a crash leaves the
        model whole or out of the store's sight, and `finish_deletes` ends what it left."""
        if is_local_source(source):
            return 0
        path = self.locate(source, revision)
        built = source.startswith("builtin:")
        freed = _finish_delete(path, built)  # one cut short before: the rename needs its name
        try:
            path.rename(_aside(path))
        except FileNotFoundError:
            return freed
        return freed + _finish_delete(path, built)

    def finish_deletes(self) -> None:
        """End the deletes a crash cut short (the directories `delete` renamed aside). Blocking;
        call at start, before the store is used. An error is logged, not raised."""
        for parent, built in ((self.home / "builtin", True), (self.home / "models", False)):
            for aside in sorted(parent.glob(f".*{_ASIDE_SUFFIX}")):
                path = aside.with_name(aside.name[1:].removesuffix(_ASIDE_SUFFIX))
                try:
                    freed = _finish_delete(path, built)
                except OSError as exc:
                    log.warning("model_delete_unfinished", path=str(aside), error=str(exc))
                else:
                    log.info("model_delete_finished", path=str(path), freed_bytes=freed)

    # -- footprints --

    def footprint(
        self, model_id: str, key: str, source: str, revision: str, sizing: Sizing
    ) -> Footprint | None:
        """What admission charges: the estimate with its weights replaced by what a load of this
        model and load config measured, if one did. None if nothing is known yet."""
        fp = self.estimate(model_id, key, source, revision, sizing)
        if fp is None:
            return None
        measured = self.measured_bytes(model_id, key, fp.weights_bytes)
        return fp if measured is None else fp.measured_as(measured)

    def estimate(
        self, model_id: str, key: str, source: str, revision: str, sizing: Sizing
    ) -> Footprint | None:
        """From the files on disk, else from the Hub's file list (`estimate_remote`), else None."""
        path = self.locate(source, revision)
        fp = self._from_disk(path, sizing) if self.is_downloaded(source, revision) else None
        if fp is None:
            with self._lock:
                fp = self._estimates.get((model_id, key))
        return fp

    def estimate_remote(
        self,
        model_id: str,
        key: str,
        snapshot: RepoSnapshot,
        sizing: Sizing,
        *,
        fetch_config: bool = True,
    ) -> Footprint:
        """Estimate before downloading: weights from the Hub's sizes, KV from its config.json.

        `fetch_config=False` fetches nothing and leaves out the KV cache: a lower bound, enough to
        turn away a model whose weights alone exceed the budget. Otherwise config.json is fetched
        into the model's directory as a verified partial, which the download then reuses.
        """
        weights = sum(f.size for f in snapshot.files if f.path.endswith(".safetensors"))
        config: dict[str, Any] = {}
        if fetch_config and any(f.path == "config.json" for f in snapshot.files):
            dest = self.locate(snapshot.repo_id, snapshot.revision)
            local = downloads.fetch_file(snapshot, "config.json", dest, token=self._token)
            config = read_json(local)
        embedding_only = any(f.path == EMBEDDING_MARKER for f in snapshot.files)
        fp = estimate(weights, config, sizing, self._process_bytes, embedding_only=embedding_only)
        with self._lock:
            self._estimates[(model_id, key)] = fp
        return fp

    def measured_bytes(self, model_id: str, key: str, estimated_bytes: int) -> int | None:
        """What the latest load of this model and config took, measured as loads are now, of
        weights estimated at `estimated_bytes` as they are now (a measurement of another kind, of
        other weights: a local model rebuilt, a Hub branch moved on; or none: the estimate is in
        charge until the next)."""
        with self._lock:
            entry = self._measurements().get(f"{model_id}@{key}")
        if not entry or entry.get("measure") != MEASURE:
            return None
        if entry.get("estimated_weights_bytes", estimated_bytes) != estimated_bytes:
            return None
        return int(entry["weights_bytes"])

    def record_measured(
        self, model_id: str, key: str, weights_bytes: int, estimated_bytes: int | None
    ) -> None:
        """Persist what a load of this model and config really took (atomically), and what its
        weights were estimated at then."""
        with self._lock:
            table = self._measurements()
            table[f"{model_id}@{key}"] = {
                "weights_bytes": int(weights_bytes),
                "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "measure": MEASURE,
            }
            if estimated_bytes is not None:
                table[f"{model_id}@{key}"]["estimated_weights_bytes"] = estimated_bytes
            write_atomic(self.home / "footprints.json", json.dumps(table, indent=1, sort_keys=True))

    def _measurements(self) -> dict[str, dict[str, Any]]:
        if self._measured is None:
            data = read_json(self.home / "footprints.json")
            self._measured = {k: v for k, v in data.items() if isinstance(v, dict)}
        return self._measured

    def _from_disk(self, path: Path, sizing: Sizing) -> Footprint | None:
        try:
            shards = sorted(p for p in path.glob("*.safetensors") if p.is_file())
            stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in shards)
            cfg = path / "config.json"
            stamp += ((cfg.name, cfg.stat().st_size, cfg.stat().st_mtime_ns),)
            embedding_only = is_embedding_model(path)
            stamp += ((EMBEDDING_MARKER, int(embedding_only), 0),)
        except OSError:
            return None
        with self._lock:
            hit = self._disk_cache.get((path, sizing))
        if hit is not None and hit[0] == stamp:
            return hit[1]
        fp = None
        if shards:
            weights = sum(safetensors_weight_bytes(p) for p in shards)
            config = read_json(path / "config.json")
            fp = estimate(
                weights, config, sizing, self._process_bytes, embedding_only=embedding_only
            )
        with self._lock:
            self._disk_cache[(path, sizing)] = (stamp, fp)
        return fp


# A model's directory while it is deleted. No model's is named so: the Hub refuses a leading dot.
_ASIDE_SUFFIX = ".deleting"


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}{_ASIDE_SUFFIX}")


def _finish_delete(path: Path, built: bool) -> int:
    """Delete the model directory `path` renamed aside, if there is one; bytes freed. A Hub
    model's directory loses only what lmx downloaded; anything else in it goes back to `path`."""
    aside = _aside(path)
    if not aside.exists():
        return 0
    if built:  # a build holds nothing but lmx's files
        freed = sum(p.stat().st_size for p in aside.rglob("*") if p.is_file())
        shutil.rmtree(aside)
        return freed
    freed = downloads.prune(aside)
    if aside.exists():
        aside.rename(path)
    return freed


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object; {} if the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
