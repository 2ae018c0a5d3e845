"""Byte counts as people read them, in logs, plans, errors and the CLI. No dependencies: the
CLI imports it without pydantic or the reconciler."""

from __future__ import annotations


def fmt_bytes(n: int) -> str:
    """`n` in the largest binary unit it reaches, to one decimal: "1.5 GiB", "96.0 KiB", "512 B"."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
