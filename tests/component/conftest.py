"""The reconciler's component tests share `world`: a World (fake engines, a real loop and files)
whose reconciler is stopped after the test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.component.reconciler_world import World


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    yield w
    if w.reconciler is not None:
        async with asyncio.timeout(10):
            await w.reconciler.stop()
