"""`lmx serve` as a subprocess for a benchmark: temporary LMX_HOME, one pinned model, free port.

`LmxServer` writes the desired state, starts the daemon on 127.0.0.1, waits until /v1/models lists
the model and stops it on exit (SIGINT, then SIGTERM, then SIGKILL). Called by run_throughput.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from lmx.runtime import steptrace


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def config_yaml(
    model_id: str,
    model_dir: Path,
    max_batch: int,
    context_length: int,
    prompt_cache_bytes: int | None = None,
) -> str:
    """lmx's config for the run; `prompt_cache_bytes` None leaves the engine's default."""
    engine = f"max_batch: {max_batch}, context_length: {context_length}"
    if prompt_cache_bytes is not None:
        engine += f", prompt_cache_bytes: {prompt_cache_bytes}"
    return (
        "# Written by bench.server for one benchmark run.\n"
        "memory: {budget: 95%}\n"
        "jit: false\n"
        "models:\n"
        f"  {model_id}:\n"
        f"    source: {model_dir.resolve()}\n"
        "    want: pinned\n"
        f"    engine: {{{engine}}}\n"
    )


class LmxServer:
    """One `lmx serve` process. Use as a context manager; `start` raises if it never gets ready."""

    def __init__(
        self,
        model_id: str,
        model_dir: Path,
        *,
        max_batch: int,
        context_length: int,
        prompt_cache_bytes: int | None = None,
        ready_timeout_s: float = 900.0,
        lmx_command: tuple[str, ...] = (sys.executable, "-m", "lmx.cli"),
    ) -> None:
        self.model_id = model_id
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._home = Path(tempfile.mkdtemp(prefix="lmx-bench-"))
        self._config = self._home / "config.yaml"
        self._config.write_text(
            config_yaml(model_id, model_dir, max_batch, context_length, prompt_cache_bytes)
        )
        self._log_path = self._home / "server.log"
        self.steps_dir = self._home / "steps"  # the model worker's step log (lmx.runtime.steptrace)
        self.trace = steptrace.TraceReader(self.steps_dir)
        self._ready_timeout_s = ready_timeout_s
        self._command = lmx_command
        self._proc: subprocess.Popen[bytes] | None = None
        self.process: psutil.Process | None = None

    def start(self) -> None:
        env = {**os.environ, "LMX_HOME": str(self._home), steptrace.ENV: str(self.steps_dir)}
        argv = [*self._command, "serve", "--config", str(self._config), "--port", str(self.port)]
        with self._log_path.open("wb") as log:
            self._proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.process = psutil.Process(self._proc.pid)
        deadline = time.monotonic() + self._ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"lmx serve exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            try:
                r = httpx.get(f"{self.base_url}/models", timeout=5.0)
                listed = r.status_code == 200 and any(
                    m["id"] == self.model_id for m in r.json()["data"]
                )
                if listed and self._ready_to_generate():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"lmx serve not ready in {self._ready_timeout_s:.0f}s:\n{self.log_tail()}"
        )

    def _ready_to_generate(self) -> bool:
        # /v1/models may list a pinned model before its load finished; one token proves it is up.
        body = {"model": self.model_id, "prompt": [100], "max_tokens": 1, "temperature": 0}
        try:
            r = httpx.post(f"{self.base_url}/completions", json=body, timeout=self._ready_timeout_s)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def cpu_s(self) -> float:
        """CPU seconds the server and its model workers have used so far (all threads)."""
        if self.process is None:
            return 0.0
        total = 0.0
        for p in (self.process, *self.process.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def totals(self) -> dict[str, float]:
        """The model's counters and histogram sums and counts on the server's /metrics, by sample
        name (`lmx_engine_steps_total`, `lmx_time_to_first_token_seconds_sum`, ...)."""
        text = httpx.get(self.base_url.removesuffix("/v1") + "/metrics", timeout=10.0).text
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            if family.type in ("counter", "histogram")
            for s in family.samples
            if s.labels.get("model") == self.model_id
            and s.name.endswith(("_total", "_sum", "_count"))
        }

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait_s in ((signal.SIGINT, 30.0), (signal.SIGTERM, 10.0)):
                proc.send_signal(sig)
                try:
                    proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            else:
                proc.kill()
                proc.wait(10.0)
        shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> LmxServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
