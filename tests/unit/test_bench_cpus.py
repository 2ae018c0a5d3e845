"""The bench's `--cpus` and `--step-cpu`: CPU lists parsed with errors naming the bad part, a pin
that holds for every thread and child process started after it, each side's stepping thread on a
core of its own, and the options it refuses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cpus import core_of, parse_cpus, pin_process
from bench.run_throughput import parse_args, stepping

linux_only = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's"
)


def test_a_cpu_list_takes_numbers_and_ranges() -> None:
    assert parse_cpus("2-5") == {2, 3, 4, 5}
    assert parse_cpus("0, 2,4-6") == {0, 2, 4, 5, 6}
    assert parse_cpus("3") == {3}


@pytest.mark.parametrize(
    ("text", "named"),
    [("a", "'a' is not a CPU number"), ("2-", "'2-'"), ("", "''"), ("5-3", "'5-3'")],
)
def test_a_bad_cpu_list_is_refused_naming_its_bad_part(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_cpus(f"1,{text}" if text else text)


@linux_only
def test_a_pinned_process_keeps_its_threads_and_children_on_its_cpus() -> None:
    cpu = min(os.sched_getaffinity(0))
    code = f"""
import os, subprocess, sys, threading
early = []
t = threading.Thread(target=lambda: early.append(threading.get_native_id()) or threading.Event().wait(2), daemon=True)
t.start()
while not early: pass
from bench.cpus import pin_process
pin_process(frozenset({{{cpu}}}))
later = []
threading.Thread(target=lambda: later.append(os.sched_getaffinity(0))).start()
child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                       capture_output=True, text=True).stdout.strip()
print(sorted(os.sched_getaffinity(early[0])), sorted(later[0]), child)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [f"[{cpu}]"] * 3


@linux_only
@pytest.mark.parametrize(
    ("cpus", "says"),
    [
        ("x", "--cpus: 'x' is not a CPU number"),
        ("100000", "--cpus: 100000 not among this process's CPUs"),
        ("all", "--cpus: leaves no CPU for lmx's clients"),
    ],
)
def test_the_bench_refuses_cpus_it_cannot_use(
    cpus: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if cpus == "all":
        cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    with pytest.raises(SystemExit):
        parse_args(["--cpus", cpus])
    assert says in capsys.readouterr().err


@linux_only
def test_the_bench_gives_lmx_clients_the_cpus_it_does_not_pin() -> None:
    available = os.sched_getaffinity(0)
    if len(available) < 2:
        pytest.skip("needs two CPUs")
    first = min(available)
    args = parse_args(["--cpus", str(first)])
    assert args.cpus == {first}
    assert args.client_cpus == available - {first}


@linux_only
def test_the_step_cpu_has_its_core_to_itself() -> None:
    available = os.sched_getaffinity(0)
    cpu = max(available)
    core = core_of(cpu)
    if not available - core:
        pytest.skip("needs a second core")
    args = parse_args(["--step-cpu", str(cpu)])
    assert cpu in core
    assert args.pinned == args.client_cpus == available - core


@linux_only
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--step-cpu", "100000"], "--step-cpu: 100000 is not among this process's CPUs"),
        (["--step-cpu", "{other}", "--cpus", "{first}"], "is not among --cpus"),
        (["--step-cpu", "{first}", "--cpus", "{first}"], "leaves no CPU for the rest"),
    ],
)
def test_the_bench_refuses_a_step_cpu_it_cannot_give(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        pytest.skip("needs two CPUs")
    with pytest.raises(SystemExit):
        parse_args([a.format(first=available[0], other=available[-1]) for a in argv])
    assert says in capsys.readouterr().err


@linux_only
def test_each_side_steps_on_the_step_cpu_and_its_other_threads_run_elsewhere(
    tmp_path: Path,
) -> None:
    available = frozenset(os.sched_getaffinity(0))
    cpu = max(available)
    if not available - core_of(cpu):
        pytest.skip("needs a second core")
    args = parse_args(["--step-cpu", str(cpu)])
    # An lmx worker: a process with a second thread, found by the step trace it wrote.
    code = "import threading, time\nthreading.Thread(target=time.sleep, args=(30,)).start()\n"
    code += "print('up', flush=True)\ntime.sleep(30)\n"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as w:
        try:
            assert w.stdout is not None and w.stdout.readline().strip() == "up"
            (tmp_path / f"steps-{w.pid}.jsonl").write_text("")
            with stepping(args, tmp_path):
                pass
            tasks = {int(t.name) for t in Path(f"/proc/{w.pid}/task").iterdir()}
            assert os.sched_getaffinity(w.pid) == {cpu}
            assert [os.sched_getaffinity(t) for t in tasks - {w.pid}] == [args.pinned]
        finally:
            w.kill()
    # Raw: this process's main thread while the block runs, and the other CPUs after it.
    try:
        with stepping(args, None):
            assert os.sched_getaffinity(0) == {cpu}
        assert os.sched_getaffinity(0) == args.pinned
    finally:  # every thread of this process, as stepping's exit moved them all
        pin_process(available)
