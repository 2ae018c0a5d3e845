"""Per-model failure records: exponential backoff, then quarantine until the spec changes.

Written only by the reconcile loop as it applies outcomes; read when it builds the observed state.
A record belongs to the spec it failed under: once the model's spec changes, it no longer applies.
Quarantines outlast a restart (the loop keeps them in the journal); backoffs start over.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmx.reconciler.spec import ModelSpec

OFFLINE = "Offline"
INSUFFICIENT_DISK = "InsufficientDisk"
JOURNAL_UNWRITABLE = "JournalUnwritable"  # the intent journal could not be written (a full disk)
# The machine's state, not the model's: these back off for as long as they last, and never
# quarantine (that would outlast the network coming back or disk being freed).
WAITING_REASONS = frozenset({OFFLINE, INSUFFICIENT_DISK, JOURNAL_UNWRITABLE})
DOWNLOAD_REASONS = WAITING_REASONS | {"DownloadFailed"}


@dataclass(frozen=True)
class Failure:
    spec: ModelSpec  # the spec these failures happened under
    count: int  # consecutive failures with no success between
    # machine-readable: LoadFailed, LoadTimeout, DownloadFailed, LoadCrashedProcess, EngineCrashed
    reason: str
    message: str
    retry_at_s: float | None
    quarantined: bool


class FailureBook:
    def __init__(
        self, *, max_failures: int = 5, base_delay_s: float = 1.0, max_delay_s: float = 300.0
    ) -> None:
        self.max_failures = max_failures
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._records: dict[str, Failure] = {}

    def current(self, model_id: str, spec: ModelSpec | None) -> Failure | None:
        """The record for this model under this spec; a changed spec starts clean, and the record
        is gone: changed back, the spec is tried again (`lmx set MODEL want=absent`, then back,
        retries a model quarantined for what the daemon cannot see change, such as a token)."""
        rec = self._records.get(model_id)
        if rec is None or spec is None:
            return None
        if rec.spec != spec:
            del self._records[model_id]
            return None
        return rec

    def failed(
        self,
        model_id: str,
        spec: ModelSpec,
        reason: str,
        message: str,
        *,
        now_s: float,
        delay_s: float | None = None,
        permanent: bool = False,
        in_a_row: int | None = None,
    ) -> Failure:
        """Record a failure: back off `base * 2**(n-1)` (at least `delay_s`), or quarantine after
        `max_failures` in a row (never for WAITING_REASONS) or at once when `permanent`.
        `in_a_row`: the count, where the caller keeps it (engine crashes: one after a request
        was served starts over, even before the load that preceded it was recorded)."""
        prev = self.current(model_id, spec)
        count = in_a_row if in_a_row is not None else (prev.count if prev else 0) + 1
        quarantined = permanent or (count >= self.max_failures and reason not in WAITING_REASONS)
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** (count - 1))
        wait = max(backoff, delay_s or 0.0)
        rec = Failure(
            spec=spec,
            count=count,
            reason=reason,
            message=message,
            retry_at_s=None if quarantined else now_s + wait,
            quarantined=quarantined,
        )
        self._records[model_id] = rec
        return rec

    def quarantine(self, model_id: str, spec: ModelSpec, reason: str, message: str) -> Failure:
        rec = Failure(spec, self.max_failures, reason, message, None, True)
        self._records[model_id] = rec
        return rec

    def succeeded(self, model_id: str, *, now_s: float) -> None:
        """A load or download of `model_id` succeeded: forget its failures, unless the record
        still holds the model back. A held-back action does not run, so such a record was
        written after this one began (the new engine crashed at once)."""
        rec = self._records.get(model_id)
        if rec is None:
            return
        if rec.quarantined or (rec.retry_at_s is not None and rec.retry_at_s > now_s):
            return
        del self._records[model_id]

    def forget_undeclared(self, declared: set[str]) -> None:
        for mid in [m for m in self._records if m not in declared]:
            del self._records[mid]
