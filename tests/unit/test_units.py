"""Byte counts as lmx writes them in plans, errors, events and the CLI."""

from __future__ import annotations

import pytest

from lmx import cli_render
from lmx.units import fmt_bytes


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (96 << 10, "96.0 KiB"),
        (512 << 20, "512.0 MiB"),
        (3 << 29, "1.5 GiB"),
        (512 << 30, "512.0 GiB"),  # no TiB: the largest machines lmx runs on have 512 GB
        (-(1 << 20), "-1.0 MiB"),  # a difference keeps its sign
    ],
)
def test_a_count_reads_in_the_largest_binary_unit_it_reaches(n: int, text: str) -> None:
    assert fmt_bytes(n) == text


def test_the_cli_writes_a_count_the_daemon_did_not_send_as_a_dash() -> None:
    assert cli_render.fmt_bytes(None) == "-"
    assert cli_render.fmt_bytes(3 << 29) == "1.5 GiB"
