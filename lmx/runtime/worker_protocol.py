"""What the MLX engine and its worker process say to each other over their socket pair.

Every message is one pickled tuple (`send`/`receive`); the first item names it. Nothing in this
module touches MLX.

Engine to worker: the LoadConfig once, then lists of commands, each list applied in one go:
`("add", sid, GenerationRequest)`, `("cancel", sid)`, `("stop",)`, and after adds
`("coming", n)`: n more requests were still being prepared in the daemon when it sent them
(`("coming", 0)` once none is), and `("embed", sid, rows)`: one vector per row of token ids.
Worker to engine: `("ready", Ready)` or `("failed", Exception)` once after the load, then
`("out", [(sid, text, token), ...], [(sid, Delta), ...], WorkerStats)` after every step that
produced output or changed the number of active sequences. A step's plain pieces (a token and its
text, nothing else) travel as tuples, which pickle an order of magnitude faster than Deltas; the
rest (endings, logprobs, a sequence's first timings) as Deltas. An embedding request is answered
`("embedded", sid, Embeddings)` or `("embed_failed", sid, message, the_request_s_fault)`. The
pair's end (EOF) means the other side is gone.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

from lmx.runtime.engine import Delta, Embeddings, GenerationRequest


@dataclass(frozen=True)
class WorkerStats:
    active: int  # sequences in the batch
    steps: int
    generated_tokens: int
    weights_bytes: int
    kv_bytes: int  # the batch's KV caches
    prompt_cache_bytes: int
    mlx_active_bytes: int  # the worker process's MLX counters
    mlx_cache_bytes: int
    prefill_steps: int = 0  # steps that also did prompt work (prefill, joining the batch)
    step_s: float = 0.0  # time in BatchGenerator.next, all steps so far
    overhead_s: float = 0.0  # the stepping thread's own work between steps, all steps


@dataclass(frozen=True)
class Ready:
    context_length: int
    vocab_size: int  # rows of the model's embedding and logits: a token id must be below it
    marker_ids: Mapping[str, int]
    device: str
    stats: WorkerStats


Command = (
    tuple[Literal["add"], int, GenerationRequest]
    | tuple[Literal["cancel"], int]
    | tuple[Literal["coming"], int]
    | tuple[Literal["embed"], int, tuple[tuple[int, ...], ...]]
    | tuple[Literal["stop"]]
)
Piece = tuple[int, str, int]  # (sid, text, token): Delta(text, (token,)) for stream sid
Report = (
    tuple[Literal["ready"], Ready]
    | tuple[Literal["failed"], Exception]
    | tuple[Literal["out"], list[Piece], list[tuple[int, Delta]], WorkerStats]
    | tuple[Literal["embedded"], int, Embeddings]
    | tuple[Literal["embed_failed"], int, str, bool]
)


def send(conn: Connection, msg: object) -> None:
    """One message. Plain pickle: `Connection.send`'s pickler copies a dispatch table per call,
    which costs more than pickling a step's output."""
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection) -> Any:
    """The next message; EOFError once the other side has closed its end."""
    return pickle.loads(conn.recv_bytes())
