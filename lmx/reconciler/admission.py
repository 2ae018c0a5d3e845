"""Budget arithmetic for one plan: which engines stay, which go, which loads are admitted.

Pure and single-use: the planner feeds it the observed engines and the load candidates, then
`admit()` decides in priority order. Only pins and requests may evict (least recently used, idle
ones first); an eagerly loaded `resident` model takes free room only, so two of them never evict
each other in turn. Busy models are drained, cut only at the drain's deadline. Room promised to a
load ahead is waited for, not refused: that model may be evicted in turn once loaded and served.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from lmx.reconciler.actions import (
    Blocked,
    BlockReason,
    CancelDownload,
    Delete,
    Download,
    Drain,
    Evict,
    Load,
    Plan,
    Resume,
    Unload,
    UnloadReason,
)
from lmx.reconciler.observed import ObservedModel, ObservedState
from lmx.reconciler.spec import DesiredState, ModelSpec, Want
from lmx.units import fmt_bytes

_Candidate = tuple[ModelSpec, ObservedModel]


def idle_ttl_s(spec: ModelSpec, o: ObservedModel) -> float | None:
    """How long a loaded model may sit idle before it is unloaded (None: for ever, LRU aside):
    its spec's `idle_ttl`; for one loaded on demand (`want: downloaded`) whose spec sets none,
    the `ttl` its latest request asked for, as LM Studio takes one for a model it loads just in
    time. A pinned model never idles out."""
    if spec.want is Want.PINNED:
        return None
    if spec.idle_ttl_s is not None or spec.want is not Want.DOWNLOADED:
        return spec.idle_ttl_s
    return o.request_ttl_s


# An engine unloaded for these reasons may be loaded again by the same plan.
_RELOAD = frozenset({UnloadReason.SPEC_CHANGED, UnloadReason.DRAINED})


def pin_bytes(o: ObservedModel, leaving: Collection[str] = ()) -> int:
    """What a pinned model takes of the budget: its engine's charge, or, where that engine
    leaves in this plan (`leaving`: to load again), its footprint, what the next one takes."""
    return (o.footprint_bytes or 0) if o.model_id in leaving else o.charge_bytes


def pinned_bytes(
    desired: DesiredState, observed: ObservedState, leaving: Collection[str] = ()
) -> int:
    """What the declared pins take of the budget, loaded or not: room no other model can have."""
    pins = [mid for mid, s in desired.models.items() if s.want is Want.PINNED]
    return sum(pin_bytes(observed.model(mid), leaving) for mid in pins)


def never_fits(spec: ModelSpec, o: ObservedModel, budget: int, pins: int) -> Blocked | None:
    """Why the model can never be loaded while the budget and the pins stay as declared: it is
    larger than the whole budget, or (not pinned itself) than what the pins leave of it."""
    fp = o.footprint_bytes
    if fp is None:
        return None
    if fp > budget:
        msg = f"needs {fmt_bytes(fp)}, the whole budget is {fmt_bytes(budget)}"
        return Blocked(o.model_id, BlockReason.EXCEEDS_BUDGET, msg)
    if spec.want is not Want.PINNED and fp > budget - pins:
        msg = (
            f"needs {fmt_bytes(fp)}; the pinned models take {fmt_bytes(pins)} of the budget of"
            f" {fmt_bytes(budget)}, leaving {fmt_bytes(max(budget - pins, 0))}"
        )
        return Blocked(o.model_id, BlockReason.EXCEEDS_BUDGET, msg)
    return None


def gate(o: ObservedModel, now_s: float) -> Blocked | None:
    """A failure record that holds back downloads and loads of this model."""
    if o.quarantine_reason is not None:
        return Blocked(o.model_id, BlockReason.QUARANTINED, o.quarantine_reason)
    if o.retry_at_s is not None and now_s < o.retry_at_s:
        wait = o.retry_at_s - now_s
        return Blocked(o.model_id, BlockReason.BACKING_OFF, f"retrying in {wait:.1f}s")
    return None


class Admission:
    def __init__(self, desired: DesiredState, observed: ObservedState, budget_bytes: int) -> None:
        self.desired = desired
        self.observed = observed
        self.now = observed.now_s
        self.budget = budget_bytes
        self.unreleased = observed.unreleased_bytes
        self.releasing = observed.releasing
        self.used = observed.unreleased_bytes
        self.resumes: list[Resume] = []
        self.drains: list[Drain] = []
        self.frees: list[Unload | Evict] = []
        self.cancels: list[CancelDownload] = []
        self.deletes: list[Delete] = []
        self.downloads: list[Download] = []
        self.loads: list[Load] = []
        self.blocked: list[Blocked] = []
        self.wakes: list[float] = []
        self.kept: list[ObservedModel] = []
        self.leaving: dict[str, UnloadReason] = {}  # unloaded by this plan
        self.draining_bytes = 0  # held by busy models on their way out
        # Held by unpinned models loading, or loaded or admitted for requests ahead: evictable
        # once loaded and served (requests wait for them rather than being refused).
        self.promised_bytes = 0
        self.pin_total = 0
        self.pin_prefix: dict[str, int] = {}
        self.candidates: dict[Want, list[_Candidate]] = {
            Want.PINNED: [],
            Want.DOWNLOADED: [],  # loads on request, whatever the model's `want`
            Want.RESIDENT: [],
        }

    # -- engines that are loaded or loading --

    def hold(self, o: ObservedModel) -> None:
        self.used += o.charge_bytes
        spec = self.desired.models.get(o.model_id)
        if spec is None or spec.want is not Want.PINNED:
            self.promised_bytes += o.charge_bytes

    def keep(self, spec: ModelSpec, o: ObservedModel) -> None:
        self.used += o.charge_bytes
        if o.draining:  # what began its drain was undone
            self.resumes.append(Resume(o.model_id))
        if spec.want is not Want.PINNED:
            if not o.requested:
                self.kept.append(o)
            else:  # evictable once its request is answered
                self.promised_bytes += o.charge_bytes
            ttl = idle_ttl_s(spec, o)
            if ttl is not None:
                # A busy model idles out `ttl` after its last request ends, so not before now +
                # ttl: look again then (the end of a request wakes the loop only for a drain).
                self.wakes.append((self.now if o.in_flight else o.last_used_s) + ttl)

    def remove(self, o: ObservedModel, reason: UnloadReason) -> None:
        deadline = o.drain_deadline_s
        if o.in_flight == 0:
            self.frees.append(Unload(o.model_id, reason))
            self.leaving[o.model_id] = reason
        elif o.draining and deadline is not None and self.now >= deadline:
            self.frees.append(Unload(o.model_id, reason, forced=True))
            self.leaving[o.model_id] = reason
        else:
            self.used += o.charge_bytes
            self.draining_bytes += o.charge_bytes
            if not o.draining:
                self.drains.append(Drain(o.model_id, reason))
            elif deadline is not None:
                self.wakes.append(deadline)
            msg = f"{reason}: waiting for {o.in_flight} request(s) in flight"
            self.blocked.append(Blocked(o.model_id, BlockReason.DRAINING, msg))

    # -- declared models --

    def note_pin(self, o: ObservedModel) -> None:
        self.pin_total += pin_bytes(o, self.leaving)
        self.pin_prefix[o.model_id] = self.pin_total

    def block(self, mid: str, reason: BlockReason, message: str) -> None:
        self.blocked.append(Blocked(mid, reason, message))

    def _gated(self, o: ObservedModel) -> bool:
        b = gate(o, self.now)
        if b is not None:
            self.blocked.append(b)
            if o.retry_at_s is not None and b.reason is BlockReason.BACKING_OFF:
                self.wakes.append(o.retry_at_s)
        return b is not None

    def _too_big(self, spec: ModelSpec, o: ObservedModel) -> bool:
        # The engines leaving are known: the declared models come after the loaded ones.
        pins = pinned_bytes(self.desired, self.observed, self.leaving)
        b = never_fits(spec, o, self.budget, pins)
        if b is not None:
            self.blocked.append(b)
        return b is not None

    def consider_download(self, spec: ModelSpec, o: ObservedModel) -> None:
        if spec.is_local:
            self.block(o.model_id, BlockReason.SOURCE_MISSING, f"no model at {spec.source}")
        elif not (self._gated(o) or self._too_big(spec, o)):
            self.downloads.append(Download(o.model_id))

    def consider_load(self, spec: ModelSpec, o: ObservedModel) -> None:
        if o.loading:
            return
        if o.resident and self.leaving.get(o.model_id) not in _RELOAD:
            return  # staying, draining, or leaving for good
        if spec.want is Want.PINNED:
            cls = Want.PINNED
        elif o.requested:
            if spec.want is Want.DOWNLOADED and not self.desired.jit:
                msg = "jit is off: a `downloaded` model is not loaded on request"
                self.block(o.model_id, BlockReason.JIT_DISABLED, msg)
                return
            cls = Want.DOWNLOADED
        elif spec.want is Want.RESIDENT and not o.idled:
            cls = Want.RESIDENT
        else:
            return
        if self._gated(o) or self._too_big(spec, o):
            return
        if o.footprint_bytes is None:
            msg = "no size estimate yet (no weights found)"
            self.block(o.model_id, BlockReason.FOOTPRINT_UNKNOWN, msg)
            return
        self.candidates[cls].append((spec, o))

    # -- admission --

    def _evictable(self) -> list[ObservedModel]:
        return sorted(self.kept, key=lambda o: (o.in_flight > 0, o.last_used_s, o.model_id))

    def admit(self) -> None:
        victims_left: list[ObservedModel] | None = None
        # Requests first come, first served: a later one must not take the room an earlier one
        # is waiting for (say, a request for the very model evicted to make that room).
        self.candidates[Want.DOWNLOADED].sort(key=lambda c: c[1].request_order)
        for why, items in self.candidates.items():
            for _spec, o in items:
                mid, fp = o.model_id, o.footprint_bytes or 0
                free = self.budget - self.used
                if fp <= free:
                    self.loads.append(Load(mid, fp, why))
                    self._commit(fp, why)
                    continue
                room = f"needs {fmt_bytes(fp)}, {fmt_bytes(max(free, 0))} free"
                if free < 0:  # models ahead of it in this plan wait for room already
                    room += f" ({fmt_bytes(-free)} more promised to loads waiting ahead of it)"
                if self.releasing and fp <= free + self.unreleased:
                    msg = f"{room}; {fmt_bytes(self.unreleased)} not yet returned by an unload"
                    self.block(mid, BlockReason.MEMORY_NOT_RELEASED, msg)
                    continue
                if why is Want.PINNED and self.pin_prefix.get(mid, 0) > self.budget:
                    msg = (
                        f"the pins declared up to this one need {fmt_bytes(self.pin_prefix[mid])}"
                        f", over the budget of {fmt_bytes(self.budget)}"
                    )
                    self.block(mid, BlockReason.PINS_EXCEED_BUDGET, msg)
                    continue
                if why is Want.RESIDENT:
                    msg = f"{room}; a resident model takes free room only (pins and requests evict)"
                    self.block(mid, BlockReason.INSUFFICIENT_MEMORY, msg)
                    continue
                if victims_left is None:
                    victims_left = self._evictable()
                self._evict_for(o, why, free, victims_left, room)

    def _commit(self, fp: int, why: Want) -> None:
        """Count a load admitted, or waiting for room, against the budget: lower priorities
        cannot take its room, and later requests wait for it (unless pinned, it is evictable
        once loaded and served)."""
        self.used += fp
        if why is not Want.PINNED:
            self.promised_bytes += fp

    def _evict_for(
        self, o: ObservedModel, why: Want, free: int, pool: list[ObservedModel], room: str
    ) -> None:
        """Make room for a pin or a request: wait for drains, else evict LRU models (idle first),
        else wait for its turn after the models promised room ahead of it.

        A model that must wait still commits its bytes, so lower priorities cannot take its room.
        """
        mid, fp = o.model_id, o.footprint_bytes or 0
        need = fp - free
        if need <= self.draining_bytes:
            self.draining_bytes -= need
            self._commit(fp, why)
            self.block(mid, BlockReason.WAITING_FOR_DRAIN, f"{room}; busy models are draining")
            return
        got, chosen = self.draining_bytes, []
        for v in pool:
            if got >= need:
                break
            chosen.append(v)
            got += v.charge_bytes
        if got < need:
            promised = self.promised_bytes
            if got + promised >= need:
                msg = (
                    f"{room}; {fmt_bytes(promised)} is promised to models loading or requested"
                    " ahead of it, each evictable once loaded and served"
                )
                self._commit(fp, why)
                self.block(mid, BlockReason.WAITING_FOR_TURN, msg)
                return
            msg = (
                f"{room}; it lacks {fmt_bytes(need)}: evicting could free {fmt_bytes(got)}, and"
                f" the models loading or requested ahead of it {fmt_bytes(promised)} once served"
                " (pinned models and memory an unload did not return stay)"
            )
            self.block(mid, BlockReason.INSUFFICIENT_MEMORY, msg)
            return
        for v in list(chosen):  # spare the ones the last, larger victims made unnecessary
            if got - v.charge_bytes >= need:
                chosen.remove(v)
                got -= v.charge_bytes
        idle_freed = busy_chosen = 0
        for v in chosen:
            pool.remove(v)
            if v.in_flight == 0:
                self.frees.append(Evict(v.model_id, mid, v.charge_bytes))
                idle_freed += v.charge_bytes
            else:
                busy_chosen += v.charge_bytes
                self.drains.append(Drain(v.model_id, UnloadReason.EVICTED, for_model=mid))
                msg = f"evicted for {mid}: waiting for {v.in_flight} request(s) in flight"
                self.block(v.model_id, BlockReason.DRAINING, msg)
        self._commit(fp, why)
        self.used -= idle_freed
        if idle_freed >= need:
            self.loads.append(Load(mid, fp, why))
        else:
            self.draining_bytes = max(0, self.draining_bytes + busy_chosen - (need - idle_freed))
            self.block(mid, BlockReason.WAITING_FOR_DRAIN, f"{room}; draining busy models")

    def result(self) -> Plan:
        later = [w - self.now for w in self.wakes if w > self.now]
        return Plan(
            actions=(
                *self.resumes,
                *self.drains,
                *self.frees,
                *self.cancels,
                *self.deletes,
                *self.downloads,
                *self.loads,
            ),
            blocked=tuple(self.blocked),
            budget_bytes=self.budget,
            used_bytes=self.used,
            requeue_after_s=min(later) if later else None,
        )


def pins_over_budget(
    desired: DesiredState, footprints: Mapping[str, int | None], total_memory_bytes: int
) -> list[str]:
    """Errors (one per line, naming the field) if the pinned models alone exceed the budget.

    Pins whose footprint is not known yet (a Hub model before its first resolve) count as 0;
    the planner blocks them later with `PinsExceedBudget` if they do not fit.
    """
    budget = desired.memory.budget_bytes(total_memory_bytes)
    pins = [
        (mid, footprints.get(mid) or 0)
        for mid, s in desired.models.items()
        if s.want is Want.PINNED
    ]
    need = sum(n for _, n in pins)
    if need <= budget:
        return []
    parts = ", ".join(f"{mid} {fmt_bytes(n)}" for mid, n in pins)
    last = next(mid for mid, _ in reversed(pins))
    declared = desired.memory.budget
    declared_text = declared if isinstance(declared, str) else fmt_bytes(declared)
    return [
        f"models.{last}.want: the pinned models need {fmt_bytes(need)} ({parts}), over the memory"
        f" budget of {fmt_bytes(budget)} (memory.budget {declared_text} of"
        f" {fmt_bytes(total_memory_bytes)})"
    ]
