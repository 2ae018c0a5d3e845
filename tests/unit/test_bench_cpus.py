"""The bench's `--cpus`: CPU lists parsed with errors naming the bad part, a pin that holds for
every thread and child process started after it, and the options it refuses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.cpus import parse_cpus
from bench.run_throughput import parse_args

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
