"""The reconciler's own knobs: timings and limits of the loop and the executor.

Not part of the desired state (a person declares models; the daemon decides how patiently to
converge). Built by the CLI from its options; tests shrink the timings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReconcilerSettings:
    home: Path  # LMX_HOME: models, builtin/, footprints.json, journal.json
    resync_interval_s: float = 30.0  # a pass even when nothing woke the loop
    watch_config: bool = True  # watch the config file's directory for edits
    # A burst of file events ends after this much quiet (an editor that truncates, then writes,
    # must not be read in between), or at the latest `watch_debounce_ms` after it began.
    watch_settle_ms: int = 50
    watch_debounce_ms: int = 500
    drain_timeout_s: float = 120.0  # then a busy model is unloaded anyway
    load_timeout_s: float = 900.0  # a load taking longer is reported failed (it may still finish)
    unload_timeout_s: float = 120.0
    release_timeout_s: float = 5.0  # wait this long for an unload's memory to come back
    release_poll_s: float = 0.1
    release_grace_s: float = 30.0  # loads that need unreturned memory wait this long for it
    release_recheck_s: float = 1.0  # how often memory still missing is measured again
    ready_timeout_s: float = 900.0  # ensure_ready gives up after this
    max_failures: int = 5  # consecutive failures before quarantine
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0
    crash_window_s: float = 600.0  # engine crashes this far apart count as consecutive
    max_steps_per_pass: int = 4  # observe-plan-execute rounds before yielding to new triggers
    event_queue_size: int = 256  # per subscriber

    @property
    def journal_path(self) -> Path:
        return self.home / "journal.json"

    @property
    def last_good_path(self) -> Path:
        """A copy of the config file as last accepted: what a start serves while it is invalid."""
        return self.home / "config.last-good.yaml"
