"""The prompt cache's own time: lmx's PromptCache against mlx-lm's LRUPromptCache, the worker's
stepping thread's time per store and per fetch, while every other sequence of the batch waits.

`python -m bench.prompt_cache [--out bench/results]`. Both hold 64 one-layer KV caches (real
mlx-lm KVCaches, one value per token: the index's time, not the copies') of conversations of N
tokens; with a system prompt, every conversation opens with the same quarter of them. Then, up
to `--ops` times (and `--budget-s` per side and case): store a conversation (the oldest goes),
fetch a new conversation's prompt (it shares the system prompt at most) and the next turn of a
stored one (its tokens and 64 more). Writes prompt-cache.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, LRUPromptCache

from lmx.runtime.mlx_prompt_cache import PromptCache, Taken, _Own

ENTRIES = 64
OPS = ("store", "fetch new", "fetch next turn")


class _Side:
    """One cache behind the three operations."""

    def __init__(self, name: str) -> None:
        if name == "mlx-lm":
            lru = LRUPromptCache(max_size=ENTRIES)
            self.store: Callable[[list[int], list[Any]], None] = lambda t, kv: lru.insert_cache(
                "m", t, kv
            )
            self.fetch: Callable[[list[int]], object] = lambda t: lru.fetch_nearest_cache("m", t)
        else:
            ours = PromptCache(1 << 62, ENTRIES)
            self.store = lambda t, kv: ours.store([Taken(t, _Own(kv))])
            self.fetch = ours.fetch


def _kv(tokens: list[int]) -> list[Any]:
    kv = KVCache()  # type: ignore[no-untyped-call]
    x = mx.zeros((1, 1, len(tokens), 1))
    kv.update_and_fetch(x, x)  # type: ignore[no-untyped-call]
    return [kv]


def _conversation(rng: random.Random, n: int, system: list[int]) -> list[int]:
    return system + [rng.randrange(150_000) for _ in range(n - len(system))]


def measure(n: int, shared: bool, ops: int, budget_s: float) -> list[dict[str, Any]]:
    """Each operation's times (ms) on each side for conversations of `n` tokens."""
    rng = random.Random(n)
    system = [rng.randrange(150_000) for _ in range(n // 4)] if shared else []
    stored = [_conversation(rng, n, system) for _ in range(ENTRIES)]
    later = [(_conversation(rng, n, system), _conversation(rng, n, system)) for _ in range(ops)]
    rows = []
    for name in ("mlx-lm", "lmx"):
        side = _Side(name)
        for t in stored:
            side.store(t, _kv(t))
        times: dict[str, list[float]] = {op: [] for op in OPS}
        history = list(stored)
        deadline = time.perf_counter() + budget_s
        for new, fresh in later:
            if times["store"] and time.perf_counter() > deadline:  # one run at least
                break
            kv = _kv(new)
            turn = [*rng.choice(history[-ENTRIES // 2 :]), *range(1, 65)]
            calls: tuple[tuple[Callable[..., object], tuple[Any, ...]], ...] = (
                (side.store, (new, kv)),
                (side.fetch, (fresh,)),
                (side.fetch, (turn,)),
            )
            for op, (call, call_args) in zip(OPS, calls, strict=True):
                t0 = time.perf_counter()
                call(*call_args)
                times[op].append((time.perf_counter() - t0) * 1e3)
            history.append(new)
        for op, ms in times.items():
            rows.append(
                {
                    "tokens": n,
                    "system_prompt": len(system),
                    "op": op,
                    "side": name,
                    "runs": len(ms),
                    "p50_ms": statistics.median(ms),
                    "max_ms": max(ms),
                }
            )
    return rows


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Prompt cache: lmx's PromptCache against mlx-lm's LRUPromptCache",
        "",
        f"{doc['entries']} conversations stored; ms of the stepping thread per operation "
        f"(median / max over up to {doc['ops']} runs); run {doc['started_at']} on "
        f"{doc['machine']}. `python -m bench.prompt_cache`; see its docstring.",
        "",
        "| tokens | system prompt | operation | mlx-lm p50 / max | lmx p50 / max | mlx-lm/lmx |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    rows = {(r["tokens"], r["system_prompt"], r["op"], r["side"]): r for r in doc["rows"]}
    for n, system, op, side in rows:
        if side != "lmx":
            continue
        theirs, ours = rows[(n, system, op, "mlx-lm")], rows[(n, system, op, "lmx")]
        runs = "" if theirs["runs"] == ours["runs"] else f" ({theirs['runs']} runs)"
        lines.append(
            f"| {n} | {system} | {op} | {theirs['p50_ms']:.3f} / {theirs['max_ms']:.2f}{runs} | "
            f"{ours['p50_ms']:.3f} / {ours['max_ms']:.2f} | "
            f"{theirs['p50_ms'] / ours['p50_ms']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--tokens", default="128,1024,4096,16384")
    p.add_argument("--ops", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=20.0, help="per side and case")
    args = p.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.tokens.split(",")):
        for shared in (False, True):
            rows += measure(n, shared, args.ops, args.budget_s)
            print(f"{n} tokens, system prompt {shared}: done", flush=True)
    doc = {
        "started_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "entries": ENTRIES,
        "ops": args.ops,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prompt-cache.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "prompt-cache.md").write_text(markdown(doc))


if __name__ == "__main__":
    main()
