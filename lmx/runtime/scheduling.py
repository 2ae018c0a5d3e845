"""CPU scheduling between the daemon and its model workers, on Linux.

A worker's threads pace its model's batch: its main thread steps, its output thread turns each
step's tokens into text and sends them to the daemon, whose threads wake for every step of every
worker. Where fewer cores are free than threads want one, the kernel lets a thread it wakes take
the core of the thread that woke it (wakeup preemption): the daemon then runs in the middle of the
worker's step, and the batch waits. On a 2-core machine that doubled the worker's own time
between steps (tiny model: 0.22 ms a step at 1 stream, 0.60 at 8; the daemon under SCHED_BATCH:
0.10-0.14 and 0.17-0.24; bench.run_throughput).

So the daemon's threads run under SCHED_BATCH, which takes no wakeup preemption: they keep their
fair share of the CPU and run at once on a free core, but no longer push a worker off its own.
Workers go back to SCHED_OTHER, the default, first thing, all but their output thread, which the
main thread wakes every step. Under SCHED_BATCH too, it made the worker's decode steps 3.5% faster
at 4 streams on a 2-core machine (lmx/raw 0.93 [0.92-0.93] against 0.90 [0.88-0.90], 24 pairs
each, bench.run_throughput), 1-2% at 1 and 2 streams. Elsewhere nothing changes (on macOS the
launchd job's ProcessType keeps the service's processes unthrottled).
"""

from __future__ import annotations

import os

import structlog

log = structlog.get_logger(__name__)


def yield_to_workers() -> bool:
    """Put the calling thread, and the threads and processes it starts from now on, under
    SCHED_BATCH. False where the system has no such policy or refuses it."""
    return _set_policy("SCHED_BATCH")


def run_as_worker() -> bool:
    """Put the calling thread back under SCHED_OTHER, whatever policy it was started with."""
    return _set_policy("SCHED_OTHER")


def _set_policy(name: str) -> bool:
    policy = getattr(os, name, None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError as exc:  # a sandbox that filters the call: run as started
        log.info("cpu_policy_unchanged", policy=name, error=str(exc))
        return False
    return True
