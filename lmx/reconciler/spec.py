"""The desired state: what the person declared in config.yaml, validated.

Owned by the reconciler; parsed from YAML text or a plain mapping. Pure: no file or network I/O
here (reading the file is `manifest.py`'s job). Validation errors name the field path and, when
the input came from YAML, the line.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from lmx.runtime.parsers import HARMONY, TOOL_PARSERS
from lmx.runtime.sampling import SamplingDefaults
from lmx.runtime.store import is_local_source

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
# What /admin shows in place of a secret to a reader without the admin key (see `redact`).
REDACTED = "<redacted>"


def parse_bytes(value: str | int) -> int:
    """'400GiB' -> bytes. Raises ValueError naming the accepted units."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be a positive number of bytes")
        return value
    m = _SIZE.match(value)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a size; use bytes or a unit like 400GiB, 64GB, 512MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_duration_s(value: str | float) -> float:
    """'1h30m' -> 5400.0; a bare number is seconds. Raises ValueError for a duration of no time
    however it is written (0, 0s, 0m0s), as for one that is not a duration."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().replace(" ", "")
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"{value!r} is not a duration; use e.g. 90s, 30m, 1h, 1h30m")
        seconds = sum(float(n) * _DURATION_S[u] for n, u in parts)
    if not seconds > 0:  # NaN too: a model would never idle out
        raise ValueError("must be a positive number of seconds")
    return seconds


class Want(StrEnum):
    ABSENT = "absent"
    DOWNLOADED = "downloaded"
    RESIDENT = "resident"
    PINNED = "pinned"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineSpec(_Strict):
    """Load parameters. They belong to the spec, never to a request: a request never reloads."""

    max_batch: Annotated[int, Field(ge=1, le=1024)] = 16
    context_length: Annotated[int | None, Field(ge=16)] = None
    max_queue: Annotated[int, Field(ge=1)] = 256
    prefill_step: Annotated[int, Field(ge=16)] = 2048
    prompt_cache_bytes: int = 512 * 2**20
    tool_parser: str | None = None
    reasoning_parser: str | None = None

    @field_validator("prompt_cache_bytes", mode="before")
    @classmethod
    def _size(cls, v: int | str) -> int:
        return 0 if v == 0 else parse_bytes(v)

    @field_validator("tool_parser")
    @classmethod
    def _tool_parser(cls, v: str | None) -> str | None:
        """A format lmx parses, or none (no tool calls): a misspelt one failed every request."""
        known = sorted((*TOOL_PARSERS, HARMONY, "none"))
        if v is not None and v not in known:
            raise ValueError(f"unknown tool parser {v!r}; known: {', '.join(known)}")
        return v


LoadKey = tuple[str, str, EngineSpec]


class ModelSpec(_Strict):
    source: str
    revision: str = "main"
    want: Want = Want.RESIDENT
    aliases: tuple[str, ...] = ()
    idle_ttl: float | str | None = None
    engine: EngineSpec = EngineSpec()
    # For requests that leave these out, over the model's generation_config.json (no reload).
    sampling: SamplingDefaults = SamplingDefaults()
    prune: bool = False

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a Hub repo (org/name), a local directory or builtin:NAME")
        return v

    @field_validator("idle_ttl")
    @classmethod
    def _ttl(cls, v: float | str | None) -> float | None:
        return None if v is None else parse_duration_s(v)

    @property
    def idle_ttl_s(self) -> float | None:
        return None if self.idle_ttl is None else float(self.idle_ttl)

    @property
    def load_key(self) -> LoadKey:
        """What a loaded engine depends on; a change here (and only here) means a reload."""
        return (self.source, self.revision, self.engine)

    def load_digest(self) -> str:
        """A short stable hash of `load_key`: names persisted footprints and journal entries."""
        text = json.dumps([self.source, self.revision, self.engine.model_dump()], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def digest(self) -> str:
        """A short stable hash of the whole spec: names a persisted quarantine, which any edit of
        the model's entry lifts."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith("builtin:")

    @property
    def is_local(self) -> bool:
        return is_local_source(self.source)

    @property
    def is_hub(self) -> bool:
        return not (self.is_builtin or self.is_local)


class MemorySpec(_Strict):
    budget: str | int = "90%"

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: str | int) -> str | int:
        if isinstance(v, str) and v.strip().endswith("%"):
            try:
                pct = float(v.strip()[:-1])
            except ValueError:
                raise ValueError(
                    f"{v!r} is not a budget; use a percentage of memory like 90%, or a size like"
                    " 400GiB, 64GB, 512MiB"
                ) from None
            if not 0 < pct <= 100:
                raise ValueError("a percentage budget must be in (0%, 100%]")
            return v.strip()
        size = parse_bytes(v)
        if size <= 0:  # 0GiB, 0.1B: no model could ever load
            raise ValueError("must be a positive number of bytes")
        return size

    def budget_bytes(self, total_bytes: int) -> int:
        """The budget in bytes for a machine with `total_bytes` of memory."""
        if isinstance(self.budget, str):
            return int(total_bytes * float(self.budget[:-1]) / 100)
        return self.budget


def _not_redacted(value: str) -> str:
    # A document read without the admin key, sent back as it came, must not install the
    # placeholder as a real key: refused (422 naming the field), never silently kept.
    if value == REDACTED:
        raise ValueError(
            f"{REDACTED!r} stands in for a secret lmx did not show; give the real key, or leave"
            " the field out of a merge patch to keep the one declared"
        )
    return value


Secret = Annotated[str, AfterValidator(_not_redacted)]


class ServerSpec(_Strict):
    admin_key: Secret | None = None
    api_keys: tuple[Secret, ...] = ()
    # Browser origins allowed to call the API (e.g. "http://localhost:3000"); "*" allows any.
    cors_origins: tuple[str, ...] = ()


def redact(data: Any) -> Any:
    """A copy of plain desired-state data (valid or not) with `server.admin_key` and each of
    `server.api_keys` replaced by REDACTED; a list keeps its length, so a reader can count keys."""
    if not isinstance(data, dict) or not isinstance(data.get("server"), dict):
        return data
    server = dict(data["server"])
    if server.get("admin_key") is not None:
        server["admin_key"] = REDACTED
    keys = server.get("api_keys")
    if isinstance(keys, list | tuple):
        server["api_keys"] = [REDACTED] * len(keys)
    elif keys is not None:
        server["api_keys"] = REDACTED
    return {**data, "server": server}


class DownloadsSpec(_Strict):
    concurrency: Annotated[int, Field(ge=1, le=16)] = 2


class DesiredState(_Strict):
    """The whole desired state. Models are keyed by the id clients send as `model`."""

    memory: MemorySpec = MemorySpec()
    jit: bool = True
    server: ServerSpec = ServerSpec()
    downloads: DownloadsSpec = DownloadsSpec()
    models: dict[str, ModelSpec] = {}

    @field_validator("models", mode="before")
    @classmethod
    def _null_models(cls, v: Any) -> Any:
        return {} if v is None else v

    @model_validator(mode="after")
    def _names(self) -> Self:
        owner: dict[str, str] = {}
        for mid in self.models:
            if not MODEL_ID.match(mid):
                raise ValueError(f"models.{mid}: not a valid model id (letters, digits, ._:/@+-)")
            owner[mid] = mid
        for mid, spec in self.models.items():
            for i, alias in enumerate(spec.aliases):
                if not MODEL_ID.match(alias):
                    raise ValueError(f"models.{mid}.aliases.{i}: {alias!r} is not a valid id")
                other = owner.setdefault(alias, mid)
                if other != mid or alias == mid:
                    if alias == mid:
                        clash = "is the model's own id"
                    elif other == alias:
                        clash = f"is already the id of model {other!r}"
                    else:
                        clash = f"is already an alias of model {other!r}"
                    raise ValueError(f"models.{mid}.aliases.{i}: alias {alias!r} {clash}")
        return self

    def resolve(self, name: str) -> str | None:
        """The model id that `name` (an id or an alias) refers to, or None."""
        if name in self.models:
            return name
        for mid, spec in self.models.items():
            if name in spec.aliases:
                return mid
        return None
