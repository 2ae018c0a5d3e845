"""A kill -9 at a chosen syscall, for crash-safety tests: the call raises `Killed` before it acts,
so what it and the code after it would have done is not done. No `except Exception` catches it;
the test then undoes the patch and starts the next "process" (a fresh store or reconciler)."""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest


class Killed(BaseException):
    """The process died here."""


def kill_at_unlink(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make the `n`th `os.unlink` from now on (Path.unlink and shutil.rmtree use it) raise."""
    real, calls = os.unlink, itertools.count(1)

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if next(calls) == n:
            raise Killed(f"killed at unlink {n} ({path})")
        real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
