"""Memory accounting with two signals: MLX's own counters and psutil's view of the processes.

The reconciler samples before and after each load (the measured footprint) and each unload (did
the memory come back?). Models live in worker processes (`lmx.runtime.mlx_worker`): MLX's
counters reach this module only through the `counters` callable the engine module passes in
(nothing here imports mlx), and the resident set is the daemon's plus its children's.
Blocking calls (`release`) belong on a thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass

import psutil  # type: ignore[import-untyped, unused-ignore]  # types-psutil: a dev dep
import structlog

log = structlog.get_logger(__name__)

MlxCounters = Callable[[], tuple[int, int]]
"""Returns MLX's (active, cache) bytes of the engines, e.g. `mlx_engine.mlx_counters`."""

# Memory that an unload returns may fall short of what the load took by this much: allocator
# slack, Python objects, the tokenizer. Beyond it the memory is reported as not released.
RELEASE_SLACK_BYTES = 64 * 2**20
RELEASE_SLACK_RATIO = 0.2


@dataclass(frozen=True)
class MemorySample:
    total_bytes: int  # physical memory of the machine
    available_bytes: int  # what the OS could give without swapping
    rss_bytes: int  # this process and its children (the model workers), idle spares left out
    mlx_active_bytes: int
    mlx_cache_bytes: int


@dataclass(frozen=True)
class Usage:
    """Bytes attributed to one engine by each signal (a load's rise, an unload's fall)."""

    mlx_bytes: int
    rss_bytes: int

    @property
    def bytes(self) -> int:
        return max(self.mlx_bytes, self.rss_bytes)


def rise(before: MemorySample, after: MemorySample, *, others_growth: int = 0) -> Usage:
    """What a load added, less what other engines grew by meanwhile (KV caches of live batches)."""
    return Usage(
        mlx_bytes=max(0, after.mlx_active_bytes - before.mlx_active_bytes - others_growth),
        rss_bytes=max(0, after.rss_bytes - before.rss_bytes - others_growth),
    )


def shortfall(
    before: MemorySample, after: MemorySample, expected: Usage, *, others_growth: int = 0
) -> int:
    """Bytes an unload should have returned and did not, by the worse of the two signals; 0 if ok.

    `expected` is what the load took; each signal must give back all but a slack of it.
    """
    worst = 0
    for took, was, now in (
        (expected.mlx_bytes, before.mlx_active_bytes, after.mlx_active_bytes),
        (expected.rss_bytes, before.rss_bytes, after.rss_bytes),
    ):
        returned = was - now + others_growth
        slack = max(RELEASE_SLACK_BYTES, int(took * RELEASE_SLACK_RATIO))
        if took - returned > slack:
            worst = max(worst, took - returned)
    return worst


def _find_malloc_trim() -> Callable[[], None] | None:
    """glibc's malloc_trim(0): hands freed heap pages back to the OS. None elsewhere (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int

    def trim() -> None:
        fn(0)

    return trim


class MemoryProbe:
    """Samples memory and asks the allocators to give freed memory back.

    `counters`: MLX's (active, cache) bytes, or None where no MLX engine runs (then 0, 0).
    `idle`: the ids of child processes waiting for a model (the spare workers), whose memory the
    resident set leaves out: a load that takes one is charged the whole worker, as is a load that
    starts its own, and one started while a load is measured is not charged to it.
    `rss` and `trim` are for tests and platforms that need another process view or allocator.
    """

    def __init__(
        self,
        counters: MlxCounters | None = None,
        *,
        idle: Callable[[], Collection[int]] = frozenset,
        rss: Callable[[], int] | None = None,
        trim: Callable[[], None] | None = None,
    ) -> None:
        self._counters = counters
        self._idle = idle
        self._process = psutil.Process()
        self._rss = rss or self._tree_rss
        self._trim = trim if trim is not None else _find_malloc_trim()

    def _tree_rss(self) -> int:
        idle = self._idle()
        total = int(self._process.memory_info().rss)
        for child in self._process.children(recursive=True):
            if child.pid in idle:
                continue
            with contextlib.suppress(psutil.Error):  # it exited meanwhile
                total += int(child.memory_info().rss)
        return total

    @property
    def can_trim(self) -> bool:
        return self._trim is not None

    def sample(self) -> MemorySample:
        vm = psutil.virtual_memory()
        active, cache = self._counters() if self._counters else (0, 0)
        return MemorySample(
            total_bytes=int(vm.total),
            available_bytes=int(vm.available),
            rss_bytes=self._rss(),
            mlx_active_bytes=int(active),
            mlx_cache_bytes=int(cache),
        )

    def release(self, *, collect: bool = False) -> None:
        """Trim the C heap; with `collect`, run a full garbage collection first (it holds the GIL
        for as long as it takes: 0.2 s in a loaded daemon is common). A worker's memory returns
        when it exits. Blocking: run it on a thread."""
        if collect:
            gc.collect()
        if self._trim is not None:
            self._trim()
