"""A local stand-in for the Hugging Face Hub: the slice of its HTTP protocol that huggingface_hub
2.4 uses for `model_info`, `hf_hub_download` and `http_get`, served from memory, with faults.

Test-only. `http.server` on 127.0.0.1 in a daemon thread. LFS files redirect, as on the real Hub,
to a "CDN" on another origin: the same server reached as `localhost`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".model", ".pth", ".pt", ".h5", ".onnx")
_PIECE = 16 * 1024  # write granularity, so throttling and drops land mid-file


@dataclass(frozen=True)
class HubFile:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer that git stores in place of an LFS file."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
            f"size {len(self.content)}\n"
        ).encode()

    @property
    def git_oid(self) -> str:
        """The git blob id of what git stores: the content, or the pointer for LFS files."""
        blob = self.pointer if self.lfs else self.content
        return hashlib.sha1(b"blob %d\0" % len(blob) + blob).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    token: str | None = None  # the credential that grants access: to everything, unless gated
    gated: bool = False  # gated: metadata is public and only files need the token


@dataclass(frozen=True)
class Seen:
    """One request as the server saw it. `file` is set when the response carried file bytes."""

    method: str
    path: str
    host: str
    headers: Mapping[str, str]  # lower-cased names
    status: int
    kind: str  # "info" | "resolve" | "cdn" | "other"
    file: str | None = None

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


class HubServer:
    """Serves repos given as {filename: bytes}; records every request; injects faults on demand."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Seen] = []
        self.errors: list[BaseException] = []  # unexpected exceptions in handler threads
        self.sleeps: list[float] = []  # huggingface_hub's retry sleeps (see conftest_hub)
        self.latency_s = 0.0
        self.bytes_per_s: float | None = None
        self.in_flight = 0  # requests being answered now
        self.max_in_flight = 0  # the most answered at once (reset it to measure a stretch)
        self._lock = threading.Lock()
        # remaining, status, path substring, Retry-After
        self._fail: list[Any] = [0, 500, None, None]
        self._drops: dict[str, tuple[int, int | None]] = {}  # file -> (offset, times left)
        self._corrupt: dict[str, int | None] = {}  # file -> times left (None: always)
        self._httpd = _Server(("127.0.0.1", 0))
        self._httpd.hub = self
        self.port = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn_url = f"http://localhost:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open keep-alive connections: the Hub becomes unreachable."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
        with self._httpd.live_lock:
            live = list(self._httpd.live)
        for conn in live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # ---------------------------------------------------------------------------------- repos

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        token: str | None = None,
        gated: bool = False,
        branch: str = "main",
    ) -> str:
        """Commit `files` as the new head of `branch` (older commits stay reachable by sha)."""
        tree = {name: HubFile(data, name.endswith(LFS_SUFFIXES)) for name, data in files.items()}
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo())
            repo.token, repo.gated = token, gated
            seed = f"{repo_id}:{len(repo.commits)}:" + ",".join(
                f"{n}={f.git_oid}" for n, f in sorted(tree.items())
            )
            commit = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[commit] = tree
            repo.refs[branch] = commit
        return commit

    # --------------------------------------------------------------------------------- faults

    def fail_next(
        self, count: int, *, status: int = 500, path_contains: str | None = None,
        retry_after: int | None = None,
    ) -> None:  # fmt: skip
        """Answer the next `count` requests (whose path contains `path_contains`) with `status`,
        and a Retry-After header if `retry_after` is given."""
        with self._lock:
            self._fail = [count, status, path_contains, retry_after]

    def drop_after(self, file: str, offset: int, *, times: int | None = 1) -> None:
        """Serve `file` only up to byte `offset`, then drop the connection; for the next `times`
        responses carrying it (None: always). A request starting past `offset` drops at once."""
        with self._lock:
            self._drops[file] = (offset, times)

    def corrupt(self, file: str, *, times: int | None = 1) -> None:
        """Flip bytes in the next `times` responses carrying `file` (None: always)."""
        with self._lock:
            self._corrupt[file] = times

    def clear_faults(self) -> None:
        with self._lock:
            self._fail = [0, 500, None, None]
            self._drops.clear()
            self._corrupt.clear()
        self.latency_s, self.bytes_per_s = 0.0, None

    # ---------------------------------------------------------------------------- observation

    def served(self, file: str) -> list[Seen]:
        """GET responses that carried (some of) `file`'s bytes, in order."""
        with self._lock:
            return [s for s in self.requests if s.file == file and s.method == "GET"]

    def count(
        self, *, kind: str | None = None, method: str | None = None, path_contains: str = ""
    ) -> int:
        """Requests seen so far, filtered by kind ("info", "resolve", "cdn"), method and path."""
        with self._lock:
            return sum(
                1
                for s in self.requests
                if (kind is None or s.kind == kind)
                and (method is None or s.method == method)
                and path_contains in s.path
            )

    # ------------------------------------------------------------------------------- handling

    def handle(self, req: _Handler, method: str) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            req.in_flight = True
        try:
            self._handle(req, method)
        finally:
            self._answered(req)

    def _answered(self, req: _Handler) -> None:
        """`req` no longer counts as in flight: called before its response's last bytes go out,
        as a client that has them may send its next request before this thread gets further."""
        with self._lock:
            if req.in_flight:
                req.in_flight = False
                self.in_flight -= 1

    def _handle(self, req: _Handler, method: str) -> None:
        if self.latency_s:
            time.sleep(self.latency_s)
        raw_path = urlsplit(req.path).path
        kind = _kind(raw_path)
        with self._lock:
            remaining, status, needle, retry_after = self._fail
            failing = remaining > 0 and (needle is None or needle in raw_path)
            if failing:
                self._fail[0] -= 1
        if failing:
            extra = {} if retry_after is None else {"Retry-After": str(retry_after)}
            return self._error(req, method, kind, status, None, "injected failure", extra)
        if kind == "info":
            return self._model_info(req, method, raw_path)
        if kind == "resolve":
            return self._resolve(req, method, raw_path)
        if kind == "cdn":
            return self._cdn(req, method, raw_path)
        return self._error(req, method, kind, 404, None, "no such route")

    def _model_info(self, req: _Handler, method: str, raw_path: str) -> None:
        rest = raw_path[len("/api/models/") :]
        repo_id, _, rev = rest.partition("/revision/")
        repo_id, rev = unquote(repo_id), unquote(rev) or "main"
        found = self._lookup(req, method, "info", repo_id, rev, files=False)
        if found is None:
            return
        commit, tree, repo = found
        blobs = "blobs=true" in (urlsplit(req.path).query or "").lower()
        siblings = []
        for name, f in sorted(tree.items()):
            entry: dict[str, Any] = {"rfilename": name}
            if blobs:
                entry |= {"size": len(f.content), "blobId": f.git_oid}
                if f.lfs:
                    entry["lfs"] = {
                        "size": len(f.content), "sha256": f.sha256, "pointerSize": len(f.pointer),
                    }  # fmt: skip
            siblings.append(entry)
        body = json.dumps(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": repo.token is not None and not repo.gated,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "lastModified": "2026-01-01T00:00:00.000Z",
                "tags": [],
                "siblings": siblings,
            }
        ).encode()
        self._send(req, method, "info", 200, {"Content-Type": "application/json"}, body, None)

    def _resolve(self, req: _Handler, method: str, raw_path: str) -> None:
        m = re.fullmatch(r"/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", raw_path)
        if m is None:
            return self._error(req, method, "resolve", 404, None, "no such route")
        repo_id, rev, name = (unquote(m[g]) for g in ("repo", "rev", "file"))
        found = self._lookup(req, method, "resolve", repo_id, rev, files=True)
        if found is None:
            return
        commit, tree, _ = found
        if name not in tree:
            return self._error(
                req, method, "resolve", 404, "EntryNotFound", "entry not found",
                {"X-Repo-Commit": commit},
            )  # fmt: skip
        f = tree[name]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{f.git_oid}"'}
        if f.lfs:  # the real Hub answers LFS files with a redirect to its CDN
            headers |= {
                "Location": f"{self.cdn_url}/cdn/{f.sha256}",
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(len(f.content)),
            }
            return self._send(req, method, "resolve", 302, headers, b"", None)
        self._content(req, method, "resolve", name, f.content, headers)

    def _cdn(self, req: _Handler, method: str, raw_path: str) -> None:
        sha = raw_path.rsplit("/", 1)[-1]
        with self._lock:
            hits = [
                (name, f)
                for repo in self.repos.values()
                for tree in repo.commits.values()
                for name, f in tree.items()
                if f.lfs and f.sha256 == sha
            ]
        if not hits:
            return self._error(req, method, "cdn", 404, None, "no such object")
        name, f = hits[0]
        self._content(req, method, "cdn", name, f.content, {"ETag": f'"{sha}"'})

    def _lookup(
        self, req: _Handler, method: str, kind: str, repo_id: str, rev: str, *, files: bool
    ) -> tuple[str, dict[str, HubFile], Repo] | None:
        auth = req.headers.get("Authorization")
        with self._lock:  # decide under the lock, answer outside it
            repo = self.repos.get(repo_id)
            authorized = repo is not None and auth == f"Bearer {repo.token}"
            commit = repo.refs.get(rev, rev) if repo is not None else ""
            tree = repo.commits.get(commit) if repo is not None else None
        if repo is None or (repo.token is not None and not repo.gated and not authorized):
            status = 404 if repo is None else 401
            self._error(req, method, kind, status, "RepoNotFound", "Repository not found")
        elif files and repo.gated and not authorized:
            status = 401 if auth is None else 403
            self._error(req, method, kind, status, "GatedRepo", "Access to model is restricted")
        elif tree is None:
            self._error(req, method, kind, 404, "RevisionNotFound", "Invalid rev id")
        else:
            return commit, tree, repo
        return None

    def _content(
        self, req: _Handler, method: str, kind: str, name: str, data: bytes, headers: dict[str, str]
    ) -> None:
        start, end, total = 0, len(data), len(data)
        status = 200
        wanted = req.headers.get("Range")
        if wanted:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
            assert m is not None, wanted
            start = int(m[1])
            end = min(int(m[2]) + 1, total) if m[2] else total
            if start >= total:
                headers = headers | {"Content-Range": f"bytes */{total}"}
                return self._send(req, method, kind, 416, headers, b"", name)
            status = 206
            headers = headers | {"Content-Range": f"bytes {start}-{end - 1}/{total}"}
        body = data[start:end]
        drop_at: int | None = None
        if method == "GET":
            with self._lock:
                if _take(self._corrupt, name):
                    body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
                if name in self._drops:
                    offset, times = self._drops[name]
                    if times is not None and times <= 1:
                        del self._drops[name]
                    elif times is not None:
                        self._drops[name] = (offset, times - 1)
                    drop_at = max(0, offset - start)
        headers = headers | {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        self._send(req, method, kind, status, headers, body, name, drop_at=drop_at)

    def _error(
        self, req: _Handler, method: str, kind: str, status: int, code: str | None, message: str,
        extra: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        headers = {"Content-Type": "application/json", "X-Error-Message": message} | (extra or {})
        if code is not None:
            headers["X-Error-Code"] = code
        body = json.dumps({"error": message}).encode()
        self._send(req, method, kind, status, headers, body, None)

    def _send(
        self, req: _Handler, method: str, kind: str, status: int, headers: dict[str, str],
        body: bytes, file: str | None, *, drop_at: int | None = None,
    ) -> None:  # fmt: skip
        seen = Seen(
            method, urlsplit(req.path).path, req.headers.get("Host", ""),
            {k.lower(): v for k, v in req.headers.items()}, status, kind, file,
        )  # fmt: skip
        with self._lock:
            self.requests.append(seen)
        req.send_response(status)
        for k, v in headers.items():
            req.send_header(k, v)
        req.send_header("Content-Length", str(len(body)))
        limit = 0 if method == "HEAD" else len(body) if drop_at is None else min(drop_at, len(body))
        if not limit:
            self._answered(req)
        req.end_headers()
        if method == "HEAD":
            return
        for at in range(0, limit, _PIECE):
            if at and self.bytes_per_s:  # between pieces: the response ends with its last byte
                time.sleep(_PIECE / self.bytes_per_s)
            if at + _PIECE >= limit:
                self._answered(req)
            req.wfile.write(body[at : min(at + _PIECE, limit)])
        req.wfile.flush()
        if drop_at is not None:
            req.close_connection = True
            req.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.live: set[socket.socket] = set()  # open connections, so stop() can cut them
        self.live_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        # A client that gives up mid-body (cancel, timeout) is expected, not a server bug.
        if error is not None and not isinstance(error, ConnectionError | TimeoutError):
            self.hub.errors.append(error)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms stalls
    server: _Server
    timeout = 10  # idle keep-alive connections end, so handler threads do too
    in_flight = False  # its request is being answered (HubServer.in_flight counts it)

    def setup(self) -> None:
        super().setup()
        with self.server.live_lock:
            self.server.live.add(self.connection)

    def finish(self) -> None:
        with self.server.live_lock:
            self.server.live.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self.server.hub.handle(self, "GET")

    def do_HEAD(self) -> None:
        self.server.hub.handle(self, "HEAD")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _kind(raw_path: str) -> str:
    if raw_path.startswith("/api/models/"):
        return "info"
    if raw_path.startswith("/cdn/"):
        return "cdn"
    return "resolve" if "/resolve/" in raw_path else "other"


def _take(faults: dict[str, int | None], name: str) -> bool:
    """Consume one use of a counted fault; True if it applies to this response."""
    if name not in faults:
        return False
    left = faults[name]
    if left is not None:
        if left <= 1:
            del faults[name]
        else:
            faults[name] = left - 1
    return True
