"""The CPUs the bench's sides run on (Linux): `--cpus` in bench.run_throughput.

On a GPU the model's step is launched by one CPU thread, and on a shared host that thread's
speed moves from run to run with the core it lands on. Pinning raw and lmx's daemon and worker to
the same few CPUs (and lmx's clients to the others) takes that part of the noise out of a pair.
`--step-cpu` goes further: the one thread of each side that steps the model (raw's loop, lmx's
worker's main thread) runs on one CPU of its own, and nothing else runs on that CPU's core.
"""

from __future__ import annotations

import os
from pathlib import Path


def parse_cpus(text: str) -> frozenset[int]:
    """CPU numbers from a list such as "2-5" or "0,2,4-7"; ValueError names the bad part."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(
                f"{part.strip()!r} is not a CPU number or a range such as 2-5"
            ) from None
        if first < 0 or last < first:
            raise ValueError(f"{part.strip()!r} is not a range of CPU numbers")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def pin_process(cpus: frozenset[int]) -> None:
    """Every thread of this process, and so every thread and process it starts later, to `cpus`."""
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue


def core_of(cpu: int) -> frozenset[int]:
    """`cpu` and the hyperthreads that share its core, as Linux's topology says (`cpu` alone
    where it says nothing)."""
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    try:
        return parse_cpus(path.read_text()) | {cpu}
    except (OSError, ValueError):
        return frozenset({cpu})


def pin_stepper(pid: int, cpu: int, rest: frozenset[int]) -> None:
    """Process `pid`'s main thread, the one that steps its model, to `cpu` alone; its other
    threads to `rest`. Threads the main thread starts later inherit `cpu`: call again to move
    them."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        try:
            os.sched_setaffinity(tid, {cpu} if tid == pid else rest)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
