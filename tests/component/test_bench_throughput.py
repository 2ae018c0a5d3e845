"""bench.run_throughput end to end on the built-in model, with raw's loop under lmx's workers'
malloc settings: the run starts itself again with them and says so in its result."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import read_json
from bench.run_throughput import raw_malloc_environment
from lmx.runtime.mlx_engine import WORKER_MALLOC, worker_environment

REPO = Path(__file__).resolve().parents[2]
OURS = ":".join(f"{name}={value}" for name, value in WORKER_MALLOC.items())


def test_raw_malloc_starts_the_run_again_only_where_the_settings_are_missing() -> None:
    assert raw_malloc_environment("default", {"PATH": "/bin"}) is None
    assert raw_malloc_environment("lmx", {"PATH": "/bin"}) == {
        "PATH": "/bin",
        "GLIBC_TUNABLES": OURS,
    }
    assert raw_malloc_environment("lmx", worker_environment({})) is None
    given = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert raw_malloc_environment("lmx", given) == worker_environment(given)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc reads GLIBC_TUNABLES")
def test_a_run_with_raw_under_lmxs_malloc_records_it_for_both_sides(
    builtin_cache: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "builtin").symlink_to(builtin_cache)  # the session's built-in model
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    environ["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bench.run_throughput", "--raw-malloc", "lmx"),
            *("--preset", "tiny", "--concurrency", "1", "--repeats", "1", "--no-again"),
            *("--min-requests", "2", "--models-dir", str(models), "--device-label", "here"),
            *("--out", str(tmp_path / "out")),
        ],
        cwd=REPO,
        env=environ,
        check=False,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    result = read_json(tmp_path / "out" / "throughput-tiny-here.json.gz")
    assert result["settings"]["glibc_tunables"] == {"raw": OURS, "workers": OURS}
    (point,) = result["points"]
    assert point["raw"]["errors"] == point["lmx"]["errors"] == 0
    assert point["ratio"] > 0
