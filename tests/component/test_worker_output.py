"""The model worker's output thread, with the worker run in this process on the real tiny model:
a sequence whose text cannot be made ends with that error and the batch goes on; a message that
cannot be sent stops the worker instead of leaving its streams waiting; the last tokens of a step
go out before the caches of the sequences it ended are stored, and a first token before the next
step begins."""

from __future__ import annotations

import gc
import socket
import threading
from collections.abc import Iterable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from mlx_lm.generate import BatchGenerator

from lmx.runtime import mlx_worker
from lmx.runtime.engine import Delta, GenerationRequest, LoadConfig, SamplingParams
from lmx.runtime.mlx_prompt_cache import PromptCache, Taken
from lmx.runtime.mlx_tokenizer import MlxTokenizer
from lmx.runtime.mlx_worker import Worker
from lmx.runtime.textstream import ByteDecoder, IncrementalDecoder
from lmx.runtime.worker_protocol import Report, receive, send

POISON = 11  # a prompt that starts with this token gets a detokenizer that fails
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


class _BrokenDecoder:
    def add(self, token: int) -> str:
        raise ValueError(f"no text for token {token}")

    def flush(self) -> str:
        return ""


@pytest.fixture
def worker(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[threading.Thread, Connection]]:
    """A Worker running in a thread of this process, and our end of its socket pair."""
    real = MlxTokenizer.detokenizer

    def detokenizer(self: MlxTokenizer, context: Sequence[int]) -> ByteDecoder | IncrementalDecoder:
        if context and context[0] == POISON:
            return _BrokenDecoder()  # type: ignore[return-value]
        return real(self, context)

    monkeypatch.setattr(MlxTokenizer, "detokenizer", detokenizer)
    ours, theirs = socket.socketpair()
    conn, worker_end = Connection(ours.detach()), Connection(theirs.detach())
    thread = threading.Thread(
        target=Worker(LoadConfig(model_id="t", path=tiny_model_dir), worker_end).run
    )
    thread.start()
    try:
        assert conn.poll(60), "the worker sent nothing in 60 s"
        assert receive(conn)[0] == "ready"
        yield thread, conn
    finally:
        send(conn, [("stop",)])
        thread.join(timeout=30)
        conn.close()  # the worker's command reader, should it still wait, reads its end
        for reader in [t for t in threading.enumerate() if t.name == "commands"]:
            reader.join(timeout=30)
        worker_end.close()
        gc.unfreeze()  # the worker froze this process's objects at its start
    assert not thread.is_alive()


def finals(conn: Connection, sids: set[int]) -> dict[int, Delta]:
    """Read the worker's messages until each of `sids` got its last delta."""
    out: dict[int, Delta] = {}
    for _ in range(1000):  # messages; a bound besides the worker's own end
        if sids <= out.keys():
            return out
        assert conn.poll(30), f"no message, and no last delta for {sids - out.keys()}"
        kind, _pieces, items, _stats = receive(conn)
        assert kind == "out"
        out |= {sid: d for sid, d in items if d.finish_reason is not None}
    raise AssertionError(f"no last delta for {sids - out.keys()}")


def test_a_sequence_whose_text_fails_ends_with_the_error_and_the_batch_goes_on(
    worker: tuple[threading.Thread, Connection],
) -> None:
    _, conn = worker
    send(
        conn,
        [
            ("add", 1, GenerationRequest([POISON, 12, 13], PARAMS)),
            ("add", 2, GenerationRequest([14, 15, 16], PARAMS)),
        ],
    )
    ended = finals(conn, {1, 2})
    assert ended[1].finish_reason == "error"
    assert (ended[1].error or "").startswith("no text for token ")
    assert (ended[2].finish_reason, ended[2].completion_tokens) == ("length", PARAMS.max_tokens)


def test_a_message_that_cannot_be_sent_stops_the_worker(
    worker: tuple[threading.Thread, Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    thread, conn = worker

    def fail(_conn: Connection, msg: object) -> None:
        raise RuntimeError("cannot send")

    monkeypatch.setattr(mlx_worker, "send", fail)
    send(conn, [("add", 1, GenerationRequest([14, 15, 16], PARAMS))])
    thread.join(timeout=30)  # without a stop from us
    assert not thread.is_alive()


def test_a_steps_last_tokens_go_out_before_their_caches_are_stored(
    worker: tuple[threading.Thread, Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, conn = worker
    finals_out, stored = threading.Event(), threading.Event()
    out_at_store: list[bool] = []
    real_send, real_store = Worker._send, PromptCache.store

    def send_(self: Worker, msg: Report) -> None:
        real_send(self, msg)
        if msg[0] == "out" and any(d.finish_reason for _, d in msg[2]):
            finals_out.set()

    def store(self: PromptCache, taken: Iterable[Taken]) -> None:
        out_at_store.append(finals_out.is_set())
        real_store(self, taken)
        stored.set()

    monkeypatch.setattr(Worker, "_send", send_)
    monkeypatch.setattr(PromptCache, "store", store)
    send(conn, [("add", i, GenerationRequest([14 + i, 15, 16], PARAMS)) for i in range(4)])
    assert len(finals(conn, set(range(4)))) == 4  # they end in one step
    assert stored.wait(30)
    assert out_at_store == [True]


def test_a_first_token_goes_out_before_the_next_step_begins(
    worker: tuple[threading.Thread, Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, conn = worker
    steps: list[list[int]] = []  # each BatchGenerator step's uids with a token
    sent_after: list[int] = []  # steps begun when a first token went out
    real_next, real_send = BatchGenerator.next, Worker._send

    def next_(self: BatchGenerator) -> Any:
        steps.append([])
        prompts, responses = real_next(self)
        steps[-1] = [r.uid for r in responses]
        return prompts, responses

    def send_(self: Worker, msg: Report) -> None:
        if msg[0] == "out" and any(d.token_ids for _, d in msg[2]):
            sent_after.append(len(steps))
        real_send(self, msg)

    monkeypatch.setattr(BatchGenerator, "next", next_)
    monkeypatch.setattr(Worker, "_send", send_)
    send(conn, [("add", 1, GenerationRequest([14, 15, 16], PARAMS))])
    assert finals(conn, {1})[1].completion_tokens == PARAMS.max_tokens
    first_step = 1 + next(i for i, uids in enumerate(steps) if uids)
    assert sent_after[0] == first_step  # no later step had begun


def test_a_joining_sequences_first_token_goes_out_without_the_rest_of_its_step(
    worker: tuple[threading.Thread, Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The step that gives a joining sequence its first token also decodes the others. The main
    # thread waits only for that first token: the others' text of the step is made while the next
    # step runs, as always. (Were it to wait for all of it, the step below would never begin.)
    _, conn = worker
    joined, next_began = threading.Event(), threading.Event()
    waited: list[bool] = []
    real_next, real_emit = BatchGenerator.next, Worker._emit_tokens

    def next_(self: BatchGenerator) -> Any:
        if joined.is_set():
            next_began.set()
        return real_next(self)

    def emit(self: Worker, tokens: list[Any], stats: Any, changed: bool) -> None:
        if joined.is_set() and not waited:  # the rest of the joiner's first step
            waited.append(next_began.wait(10))
        real_emit(self, tokens, stats, changed)
        if any(seq.sid == 2 and generated == 1 for seq, _, _, generated, _ in tokens):
            joined.set()

    monkeypatch.setattr(BatchGenerator, "next", next_)
    monkeypatch.setattr(Worker, "_emit_tokens", emit)
    long = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    send(conn, [("add", 1, GenerationRequest([14, 15, 16], long))])
    assert conn.poll(30)
    receive(conn)  # its first token: it is decoding
    send(conn, [("add", 2, GenerationRequest([17, 18, 19], PARAMS))])
    ended = finals(conn, {1, 2})
    assert ended[1].completion_tokens == 48 and ended[2].completion_tokens == PARAMS.max_tokens
    assert waited == [True]
