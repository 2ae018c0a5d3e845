"""lmx.runtime.scheduling: the daemon's threads under SCHED_BATCH, its workers back on the
default policy."""

from __future__ import annotations

import os
import threading

import pytest

from lmx.runtime.scheduling import run_as_worker, yield_to_workers

pytestmark = pytest.mark.skipif(
    not hasattr(os, "SCHED_BATCH"), reason="Linux's scheduling policies"
)


def test_threads_started_after_yielding_inherit_the_batch_policy() -> None:
    seen: dict[str, int] = {}

    def child() -> None:
        seen["child"] = os.sched_getscheduler(0)
        assert run_as_worker()
        seen["worker"] = os.sched_getscheduler(0)

    def daemon() -> None:  # its own thread: the policy is per thread, pytest's stays as it is
        assert yield_to_workers()
        seen["daemon"] = os.sched_getscheduler(0)
        t = threading.Thread(target=child)
        t.start()
        t.join(10)

    t = threading.Thread(target=daemon)
    t.start()
    t.join(10)
    assert seen == {"daemon": os.SCHED_BATCH, "child": os.SCHED_BATCH, "worker": os.SCHED_OTHER}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
