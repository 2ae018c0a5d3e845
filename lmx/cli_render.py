"""How `lmx` commands show the daemon's documents: the status and ps tables, the plan as a
terraform-like diff, one line per event, and download progress bars (rich).

Called by lmx.cli with plain JSON documents from lmx.client; pure formatting, no HTTP.
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
)
from rich.table import Table
from rich.text import Text

from lmx import units
from lmx.client import Doc, conditions, problems_of

NO_CHANGES = "No changes. The running state matches the desired state."

_UNLOAD_WHY = {
    "NotDeclared": "no longer declared",
    "WantAbsent": "want: absent",
    "Demoted": "want: downloaded",
    "SpecChanged": "spec changed",
    "IdleTimeout": "idle past its idle_ttl",
    "Drained": "drained",
    "Evicted": "evicted",
}


def console(*, stderr: bool = False) -> Console:
    """A console that does not cut lines short when output goes to a pipe or a file."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else units.fmt_bytes(n)


def fmt_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def ago(iso: str | None, now: datetime | None = None) -> str:
    if not iso:
        return "-"
    then = datetime.fromisoformat(iso)
    return fmt_duration(max(0.0, ((now or datetime.now(UTC)) - then).total_seconds())) + " ago"


def _why(cond: Doc) -> str:
    return " ".join(p for p in (cond.get("reason", ""), cond.get("message", "")) if p)


def model_state(model: Doc, blocked: Doc | None) -> tuple[Text, str]:
    """A model's state as a short cell, and the message that explains it ("" if none), from its
    conditions and the plan's blocked item."""
    conds = conditions(model)

    def c(kind: str) -> Doc:
        return conds.get(kind, {})

    def cell(text: str, style: str, cond: Doc | None = None) -> tuple[Text, str]:
        return Text(text, style), str((cond or {}).get("message", ""))

    degraded = c("Degraded") if c("Degraded").get("status") else None
    if not conds:
        return cell("Pending", "dim")
    if c("Quarantined").get("status"):
        return cell(f"Quarantined: {c('Quarantined').get('reason')}", "bold red", c("Quarantined"))
    if c("Draining").get("status"):
        return cell("Draining", "yellow", c("Draining"))
    if c("Ready").get("status"):
        if degraded:
            return cell(f"Ready, degraded: {degraded.get('reason')}", "yellow", degraded)
        return cell("Ready", "green")
    if "Loading" in (c("Ready").get("reason"), c("Resident").get("reason")):
        return cell("Loading", "cyan")
    if c("Downloaded").get("reason") == "Downloading":
        return Text(f"Downloading {c('Downloaded').get('message', '')}".rstrip(), "cyan"), ""
    if blocked is not None:
        text, message = cell(f"Blocked: {blocked['reason']}", "red", blocked)
        if degraded:  # the failure it waits out (BackingOff): only --json said what it was
            why = f"{degraded.get('reason')}: {degraded.get('message', '')}".rstrip(": ")
            message = f"{why}; {message}" if message else why
        return text, message
    if degraded:
        return cell(f"Degraded: {degraded.get('reason')}", "yellow", degraded)
    downloaded = c("Downloaded")
    if downloaded and not downloaded.get("status") and downloaded.get("reason") != "NotDownloaded":
        return cell(str(downloaded.get("reason")), "red", downloaded)
    ready = c("Ready").get("reason", "")
    if ready == "LoadsOnRequest" or c("Resident").get("reason") == "IdleTimeout":
        return cell("Downloaded (loads on request)", "dim")
    if ready == "NotWanted":
        return cell("Absent" if model.get("want") == "absent" else "Not declared", "dim")
    return cell(ready or "Pending", "dim", c("Ready"))


def _footprint(model: Doc) -> int | None:
    fp = model.get("footprint") or {}
    value = fp.get("measured_bytes") or fp.get("estimated_bytes")
    return int(value) if value is not None else None


def _blocked_by_model(doc: Doc) -> dict[str, Doc]:
    return {b["model"]: b for b in (doc.get("plan") or {}).get("blocked", [])}


def _table(*columns: str, right: tuple[str, ...] = ()) -> Table:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for name in columns:
        t.add_column(name, justify="right" if name in right else "left", no_wrap=True)
    return t


def status_table(doc: Doc) -> tuple[Table, list[Text]]:
    """The models table, and one note per model whose state has a message."""
    t = _table(
        *("MODEL", "WANT", "STATE", "RESIDENT", "FOOTPRINT", "IN-FLIGHT", "LAST USED"),
        right=("IN-FLIGHT",),
    )
    blocked = _blocked_by_model(doc)
    notes = []
    for mid, m in doc.get("models", {}).items():
        state, message = model_state(m, blocked.get(mid))
        if message:
            notes.append(Text(f"{mid}: {message}", state.style))
        notes += [Text(f"{mid}: {note}", "yellow") for note in m.get("notes") or ()]
        t.add_row(
            Text(mid),
            m.get("want") or "(undeclared)",
            state,
            fmt_bytes(m.get("resident_bytes") or None),
            fmt_bytes(_footprint(m)),
            str(m.get("in_flight", 0)),
            ago(m.get("last_used")),
        )
    return t, notes


def status_footer(doc: Doc) -> list[Text]:
    mem = doc.get("memory") or {}
    lines = [
        Text(
            f"Memory: {fmt_bytes(mem.get('charged_bytes'))} charged of "
            f"{fmt_bytes(mem.get('budget_bytes'))} budget"
        ),
        Text(
            f"System: {fmt_bytes(mem.get('available_bytes'))} available of "
            f"{fmt_bytes(mem.get('total_bytes'))}; "
            f"lmx RSS {fmt_bytes(mem.get('process_rss_bytes'))}"
        ),
    ]
    if mem.get("unreleased_bytes"):
        lines.append(Text(f"  {fmt_bytes(mem['unreleased_bytes'])} not yet released", "yellow"))
    gen, seen = doc.get("generation"), doc.get("observedGeneration")
    lag = "" if gen == seen else " (reconciling)"
    lines.append(Text(f"Generation: {gen}, observed {seen}{lag}"))
    config = doc.get("config") or {}
    kept = config.get("last_good_kept", True)
    invalid = "the last good state is kept" if kept else "no model is served until it is fixed"
    lines += config_lines(config, invalid=invalid)
    lines += [Text(f"Warning: {w}", "bold yellow") for w in doc.get("warnings") or []]
    return lines


def config_lines(config: Doc, *, invalid: str) -> list[Text]:
    """The config file's validity (a `config` of /admin/status or /admin/plan): one line, or for
    an invalid file a heading that ends with what `invalid` says of it, then each error."""
    where = f" ({config['path']})" if config.get("path") else ""
    if config.get("valid", True):
        return [Text(f"Config: valid{where}", "green")]
    problems = problems_of(str(config.get("error", "")))
    return [
        Text(f"Config: INVALID{where}; {invalid}:", "bold red"),
        *(Text(f"  {p}", "red") for p in problems),
    ]


def ps_table(doc: Doc) -> Table:
    numbers = ("PID", "IN-FLIGHT", "WAITING", "IDLE TTL", "CONTEXT")
    t = _table(
        *("MODEL", "PID", "RESIDENT", "FOOTPRINT", "IN-FLIGHT", "WAITING", "LAST USED"),
        *("IDLE TTL", "CONTEXT"),
        right=numbers,
    )
    for mid, m in loaded_models(doc).items():
        ctx = (m.get("footprint") or {}).get("context_tokens")
        pid = m.get("pid")
        t.add_row(
            Text(mid),
            str(pid) if pid else "-",
            fmt_bytes(m.get("resident_bytes")),
            fmt_bytes(_footprint(m)),
            str(m.get("in_flight", 0)),
            str(m.get("waiting", 0)),
            ago(m.get("last_used")),
            "-" if (ttl := m.get("idle_ttl_s")) is None else fmt_duration(ttl),
            str(ctx) if ctx else "-",
        )
    return t


def loaded_models(doc: Doc) -> dict[str, Doc]:
    return {
        mid: m
        for mid, m in doc.get("models", {}).items()
        if conditions(m).get("Resident", {}).get("status")
    }


def plan_lines(plan: Doc) -> list[Text]:
    """A plan as a terraform-like diff, with a summary line (or NO_CHANGES)."""
    actions: list[Doc] = plan.get("actions", [])
    loads = {a["model"]: a for a in actions if a["action"] == "Load"}
    # Loaded again by this plan: a model loaded on request (`downloaded`) is only unloaded, and
    # a busy one drained, to be loaded (or not) by a later plan.
    reloads = {
        a["model"]
        for a in actions
        if a["action"] == "Unload" and a.get("reason") == "SpecChanged" and a["model"] in loads
    }
    out: list[Text] = []
    added = removed = 0
    for a in actions:
        mid, kind = a["model"], a["action"]
        if mid in reloads and kind == "Load":
            continue
        if mid in reloads:
            load = loads[mid]
            size = f"{fmt_bytes(load['footprint_bytes'])}, {load['why']}"
            out.append(Text(f"-/+ reload {mid} (spec changed; {size})", "yellow"))
            continue
        match kind:
            case "Download":
                line, added = f"+ download {mid}", added + 1
            case "Load":
                line, added = (
                    f"+ load {mid} ({fmt_bytes(a['footprint_bytes'])}, {a['why']})",
                    added + 1,
                )
            case "Evict":
                freed = fmt_bytes(a.get("freed_bytes"))
                line = f"- evict {mid} (LRU: frees {freed} for {a.get('for_model')})"
            case "Unload" | "Drain":
                why = _UNLOAD_WHY.get(a.get("reason", ""), a.get("reason", ""))
                forced = ", forced: requests were still in flight" if a.get("forced") else ""
                then = "; unloads once its requests finish" if kind == "Drain" else ""
                line = f"- {kind.lower()} {mid} ({why}{forced}{then})"
            case "Resume":
                line = f"~ resume {mid} (what began its drain was undone: it stays loaded)"
            case "CancelDownload":
                line = f"- cancel download {mid}"
            case "Delete":
                line = f"- delete {mid} (files on disk)"
            case _:
                line = f"? {kind.lower()} {mid}"
        removed += line.startswith("-")
        out.append(Text(line, "green" if line.startswith("+") else "red"))
    under_way: list[Doc] = plan.get("under_way", [])
    for u in under_way:
        doing = "loading" if u["action"] == "Load" else "downloading"
        out.append(Text(f"~ {doing} {u['model']} (under way)", "yellow"))
    blocked: list[Doc] = plan.get("blocked", [])
    for b in blocked:
        out.append(
            Text(f"~ blocked {b['model']}: {b['reason']} {b.get('message', '')}".rstrip(), "yellow")
        )
    if not actions and not blocked and not under_way:
        return [Text(NO_CHANGES)]
    memory = (
        f"memory after: {fmt_bytes(plan.get('used_bytes'))} of "
        f"{fmt_bytes(plan.get('budget_bytes'))} budget"
    )
    parts = [f"{added} to add", f"{len(reloads)} to reload", f"{removed} to remove"]
    parts = [p for p in parts if "to reload" not in p or reloads]
    parts += [f"{len(under_way)} under way"] if under_way else []
    out += [Text(""), Text(f"Plan: {', '.join(parts)}, {len(blocked)} blocked; {memory}.", "bold")]
    return out


def event_line(event: Doc) -> str:
    when = datetime.fromtimestamp(float(event.get("time", 0))).strftime("%H:%M:%S.%f")[:-3]
    kind = str(event.get("type", "?"))
    return f"{when}  {kind:<17} {event.get('model') or '-':<20} {event_message(event)}"


def event_message(event: Doc) -> str:
    match event.get("type"):
        case "condition_changed":
            c = event.get("condition") or {}
            return f"{c.get('type')}={c.get('status')} {_why(c)}".rstrip()
        case "action":
            detail = ": ".join(str(event[k]) for k in ("reason", "message") if event.get(k))
            took = f" in {event['duration_s']}s" if event.get("duration_s") else ""
            return f"{event.get('action')} {event.get('result')}{took}" + (
                f" ({detail})" if detail else ""
            )
        case "download_progress":
            eta = event.get("eta_s")
            return (
                f"{event.get('file')}: {fmt_bytes(event.get('bytes_done'))} of "
                f"{fmt_bytes(event.get('bytes_total'))} at {fmt_bytes(event.get('rate_bps'))}/s"
                + (f", {fmt_duration(eta)} left" if eta is not None else "")
            )
        case "desired_changed":
            return f"generation {event.get('generation')} from {event.get('origin')}"
        case "config_invalid":
            return f"{event.get('path')}: " + "; ".join(event.get("errors") or [])
        case "memory_released":
            return "memory came back from " + ", ".join(event.get("models") or [])
        case "dropped":
            return f"{event.get('count')} events dropped (this client was too slow)"
        case _:
            rest = {k: v for k, v in event.items() if k not in ("type", "seq", "time", "model")}
            return " ".join(f"{k}={v}" for k, v in rest.items())


class _RateColumn(ProgressColumn):
    """The daemon's own rate and ETA (they count resumed bytes right), not rich's estimate."""

    def render(self, task: Task) -> Text:
        rate: Any = task.fields.get("rate_bps")
        eta: Any = task.fields.get("eta_s")
        left = f", {fmt_duration(eta)} left" if eta is not None else ""
        return Text(f"{fmt_bytes(rate)}/s{left}" if rate is not None else "", "cyan")


def download_progress(con: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        _RateColumn(),
        console=con,
        transient=False,
    )
