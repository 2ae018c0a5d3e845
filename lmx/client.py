"""The client side of the admin API: `AdminClient` over httpx (requests, SSE, and a streamed
chat completion for `lmx chat`), the admin key, merge patches built from `key=value` words, and
readings of the status document (a download's verdict, followed live by `watch_download`).

Used by the `lmx` commands other than `serve`; talks to the daemon only through HTTP and imports
nothing of the daemon. Failures surface as `DaemonError`s whose message is the one line to show.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import yaml

from lmx.errors import LmxError
from lmx.settings import default_home

MERGE_PATCH = "application/merge-patch+json"
Doc = dict[str, Any]

# Keys whose values are strings even when they look like numbers (a commit sha of digits).
_STRING_KEYS = frozenset({"source", "revision"})
# A download that is not finished and not failed shows one of these as its Downloaded reason.
_DOWNLOAD_PENDING = frozenset(
    {"", "NotDownloaded", "Downloading", "WaitingForDrain", "MemoryNotReleased"}
)


class DaemonError(LmxError):
    """The daemon could not be reached or refused a request; `str()` is the line to show."""


class KeyRefused(DaemonError):
    """401: the admin key is missing or wrong."""


class ChangedMeanwhile(DaemonError):
    """412: the desired state changed between our read and our write."""


class Invalid(DaemonError):
    """422: the desired state would be invalid. `problems` holds one line per field."""

    def __init__(self, message: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(message)


@dataclass(frozen=True)
class AdminKey:
    value: str | None
    origin: str  # where it came from, for the message when it is refused


def resolve_admin_key(explicit: str | None) -> AdminKey:
    """--admin-key, else $LMX_ADMIN_KEY, else the key the daemon uses: `server.admin_key` in
    LMX_HOME/config.yaml when declared, else LMX_HOME/admin.key (None if that is unreadable)."""
    if explicit:
        return AdminKey(explicit, "--admin-key")
    if env := os.environ.get("LMX_ADMIN_KEY"):
        return AdminKey(env, "LMX_ADMIN_KEY")
    home = default_home()
    config = home / "config.yaml"
    if declared := _declared_admin_key(config):
        return AdminKey(declared, f"server.admin_key in {config}")
    path = home / "admin.key"
    try:
        return AdminKey(path.read_text(encoding="utf-8").strip() or None, str(path))
    except OSError:
        return AdminKey(None, str(path))


def _declared_admin_key(config: Path) -> str | None:
    """`server.admin_key` of the config file, read as the daemon reads it; None when the file
    is missing, unreadable or declares none (the daemon then uses admin.key too)."""
    try:
        doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    server = doc.get("server") if isinstance(doc, dict) else None
    key = server.get("admin_key") if isinstance(server, dict) else None
    return key if isinstance(key, str) and key else None


def problems_of(message: str) -> list[str]:
    """'source: a.b: bad; c: worse' (a ConfigError's text) -> ['a.b: bad', 'c: worse']."""
    _, sep, rest = message.partition(": ")
    return [p.strip() for p in (rest if sep else message).split("; ") if p.strip()]


class InvalidUrl(DaemonError):
    """--url (or $LMX_URL) is not an http(s) URL, or $LMX_PORT (where neither is given) is no
    port number."""


def check_url(url: str) -> str:
    """`url` without a trailing slash. Raises InvalidUrl with the line to show."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise InvalidUrl(f"invalid URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidUrl(f"invalid URL {url!r}: give the daemon as http://HOST:PORT")
    return url.rstrip("/")


class AdminClient:
    def __init__(self, url: str, key: AdminKey, *, timeout_s: float = 30.0) -> None:
        self.url = check_url(url)
        self.key = key
        headers = {"Authorization": f"Bearer {key.value}"} if key.value else {}
        self._timeout = httpx.Timeout(timeout_s, connect=5.0)
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=self._timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- requests --

    def status(self) -> Doc:
        return self._json(self._call("GET", "/admin/status"))

    def plan(self) -> Doc:
        return self._json(self._call("GET", "/admin/plan"))

    def desired(self) -> tuple[Doc, str]:
        """The desired-state document and its ETag."""
        r = self._call("GET", "/admin/desired")
        return self._json(r), r.headers.get("etag", "")

    def patch(self, patch: Doc, *, if_match: str | None = None, dry_run: bool = False) -> Doc:
        headers = {"Content-Type": MERGE_PATCH, **({"If-Match": if_match} if if_match else {})}
        body = json.dumps(patch).encode()
        params = {"dry_run": "true"} if dry_run else {}
        r = self._call("PATCH", "/admin/desired", content=body, headers=headers, params=params)
        return self._json(r)

    def replace(self, text: str, *, dry_run: bool = False) -> Doc:
        params = {"dry_run": "true"} if dry_run else {}
        headers = {"Content-Type": "application/yaml"}
        r = self._call(
            "PUT", "/admin/desired", content=text.encode(), headers=headers, params=params
        )
        return self._json(r)

    def events(
        self, on_open: Callable[[], None] | None = None, after: int | None = None
    ) -> Iterator[Doc]:
        """Follow /admin/events: yields each event; raises DaemonError when the stream ends.
        `on_open` runs once the daemon has subscribed us (no later event is missed); `after`
        (an event's `seq`) resumes after that event, with what the daemon kept since."""
        headers = {"Last-Event-ID": str(after)} if after is not None else {}
        with self._sse("GET", "/admin/events", headers=headers) as events:
            if on_open is not None:
                on_open()
            for data in events:
                event: Doc = json.loads(data)
                yield event
        raise DaemonError(f"the daemon at {self.url} closed the event stream")

    def chat(self, body: Doc) -> Generator[Doc]:
        """Stream a chat completion (`body` as /v1/chat/completions takes it): yields each
        chunk, the last with the usage. Raises DaemonError for a refused request, or an error
        the stream ends with. Closing the iterator early closes the stream, which stops the
        generation."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with self._sse("POST", "/v1/chat/completions", json=body) as events:
            for data in events:
                if data == "[DONE]":
                    return
                chunk: Doc = json.loads(data)
                if error := chunk.get("error"):
                    raise DaemonError(
                        str(error.get("message") if isinstance(error, dict) else error)
                    )
                yield chunk

    # -- plumbing --

    @contextlib.contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError:
            raise DaemonError(
                f"cannot reach the daemon at {self.url} (is `lmx serve` running?)"
            ) from None
        except httpx.TimeoutException:
            raise DaemonError(f"the daemon at {self.url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise DaemonError(f"lost the connection to the daemon at {self.url}: {exc}") from None

    @contextlib.contextmanager
    def _sse(self, method: str, path: str, **kw: Any) -> Iterator[Iterator[str]]:
        """The data of a streamed answer's server-sent events, once the daemon took the
        request (DaemonError if it refused it, or the connection fails meanwhile)."""
        timeout = httpx.Timeout(self._timeout.connect, read=60.0)  # keep-alives come every 15 s
        with self._translate(), self._http.stream(method, path, timeout=timeout, **kw) as r:
            if r.status_code >= 400:
                r.read()
                self._raise_for(r)
            yield _sse_data(r.iter_lines())

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        with self._translate():
            r = self._http.request(method, path, **kw)
        if r.status_code >= 400:
            self._raise_for(r)
        return r

    def _json(self, r: httpx.Response) -> Doc:
        try:
            body = r.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise DaemonError(
                f"{self.url} answered something that is not lmx (HTTP {r.status_code})"
            )
        return body

    def _raise_for(self, r: httpx.Response) -> None:
        try:
            err = r.json()["error"]
            message = str(err.get("message") or "")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DaemonError(f"{self.url} answered HTTP {r.status_code}, not lmx") from None
        match r.status_code:
            case 401 if self.key.value is None:
                raise KeyRefused(
                    f"no admin key: {self.key.origin} is missing (or give --admin-key)"
                )
            case 401:
                hint = "" if self.key.origin == "--admin-key" else " or --admin-key"
                raise KeyRefused(f"the admin key was refused ({self.key.origin}{hint})")
            case 412:
                raise ChangedMeanwhile("the desired state changed meanwhile; retry")
            case 422:
                listed = err.get("errors")
                problems = [str(p) for p in listed] if isinstance(listed, list) else None
                raise Invalid(message, problems or problems_of(message))
            case _:
                raise DaemonError(f"{message} (HTTP {r.status_code})")


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The data of each server-sent event in `lines` (comments and other fields skipped)."""
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif not line and data:
            yield "\n".join(data)
            data = []


# -- building a merge patch from `key=value` words --


def _yaml_scalar(key: str, raw: str) -> Any:
    if not raw.strip() or raw.strip() in ("null", "~"):
        return None  # a merge patch's null deletes the key
    if key in _STRING_KEYS:
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, date):  # JSON has no dates: keep what was typed
        return raw
    if key == "aliases" and isinstance(value, str):
        return [a.strip() for a in value.split(",") if a.strip()]
    return value


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """['want=pinned', 'engine.max_batch=8'] -> {'want': 'pinned', 'engine': {'max_batch': 8}}.
    Raises ValueError naming the bad item."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise ValueError(f"{item!r} is not key=value (e.g. want=pinned, engine.max_batch=8)")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{item!r}: {part} was given a value already")
        node[path[-1]] = _yaml_scalar(path[-1], raw)
    return out


# -- readings of the status document --


def conditions(model: Doc) -> dict[str, Doc]:
    return {c["type"]: c for c in model.get("conditions") or []}


@dataclass(frozen=True)
class Verdict:
    ok: bool
    message: str


def download_verdict(doc: Doc, model_id: str, generation: int) -> Verdict | None:
    """Whether `model_id`'s download is done (ok), failed (not ok), or still running (None).
    Status older than `generation` (our edit) says nothing yet."""
    if doc.get("observedGeneration", 0) < generation:
        return None
    model = doc.get("models", {}).get(model_id)
    if model is None:
        return Verdict(
            False, f"{model_id} is not declared in the state the daemon runs (see `lmx status`)"
        )
    conds = conditions(model)
    quarantined = conds.get("Quarantined", {})
    downloaded = conds.get("Downloaded", {})
    if downloaded.get("status"):
        return Verdict(True, f"{model_id} is downloaded ({model.get('source')})")
    if quarantined.get("status"):
        retry = f"lmx set {model_id} want=absent, then want={model.get('want')}"
        why = f"{model_id} is quarantined: {_why(quarantined)} (to retry: {retry})"
        return Verdict(False, why)
    reason = str(downloaded.get("reason", ""))
    if reason in _DOWNLOAD_PENDING:
        return None
    why = _why(downloaded)
    if (degraded := conds.get("Degraded", {})).get("status"):
        # A failure whose reason is not Download* (Offline, InsufficientDisk) shows only here.
        why = f"{_why(degraded)}; the daemon retries ({why})"
    return Verdict(False, f"{model_id} was not downloaded: {why}")


def _why(cond: Doc) -> str:
    return ": ".join(str(cond[k]) for k in ("reason", "message") if cond.get(k))


def watch_download(
    client: AdminClient,
    model_id: str,
    start: Callable[[], int],
    on_progress: Callable[[Doc], None],
    poll_s: float = 1.0,
) -> Verdict:
    """Subscribe to events, then call `start` (which makes the edit and returns its generation),
    then report progress until the download's verdict. Status is re-read on each event for the
    model and every `poll_s`, so a dropped event only delays the answer."""
    inbox: queue.Queue[Doc | BaseException] = queue.Queue()
    opened = threading.Event()
    watcher = AdminClient(client.url, client.key)

    def follow() -> None:
        try:
            for event in watcher.events(on_open=opened.set):
                inbox.put(event)
        except BaseException as exc:  # handed to the main thread, which decides
            inbox.put(exc)
        finally:
            opened.set()

    thread = threading.Thread(target=follow, name="lmx-events", daemon=True)
    thread.start()
    try:
        opened.wait(15.0)
        if not thread.is_alive() and isinstance(failed := inbox.get_nowait(), BaseException):
            raise failed
        generation = start()
        while True:
            with contextlib.suppress(queue.Empty):
                item = inbox.get(timeout=poll_s)
                if isinstance(item, BaseException):
                    raise item
                if item.get("model") != model_id:
                    continue
                if item.get("type") == "download_progress":
                    on_progress(item)
                    continue
            if verdict := download_verdict(client.status(), model_id, generation):
                return verdict
    finally:
        watcher.close()
