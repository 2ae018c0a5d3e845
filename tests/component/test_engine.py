"""The MLX engine with the real tiny model: continuous batching keeps every request its own,
and the worker process behind it starts, stops and dies without taking anything else down."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx_lm
import psutil  # type: ignore[import-untyped, unused-ignore]
import pytest

from lmx.errors import QueueFull, RequestError
from lmx.runtime import grammars, steptrace
from lmx.runtime.engine import (
    Constraint,
    Delta,
    EngineState,
    GenerationRequest,
    LoadConfig,
    SamplingParams,
)
from lmx.runtime.intake import Intake
from lmx.runtime.memory import MemoryProbe, rise
from lmx.runtime.mlx_engine import MlxEngine, Spares, mlx_counters, worker_environment
from lmx.runtime.steptrace import TraceReader, switches
from tests.component.reconciler_world import until
from tests.harmony import HARMONY_NAMES, harmony_model

GREEDY = SamplingParams(max_tokens=16, temperature=0)


async def run(
    engine: MlxEngine, prompt: list[int], params: SamplingParams, request_id: str = ""
) -> tuple[str, Delta]:
    text, last = [], None
    async for d in engine.stream(GenerationRequest(prompt, params, request_id=request_id)):
        text.append(d.text)
        last = d
    assert last is not None
    return "".join(text), last


async def run_after(
    engine: MlxEngine, delay_s: float, prompt: list[int], params: SamplingParams
) -> tuple[str, Delta]:
    await asyncio.sleep(delay_s)
    return await run(engine, prompt, params)


@contextlib.asynccontextmanager
async def traced_engine(
    config: LoadConfig,
    steps_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    intake: Intake | None = None,
) -> AsyncIterator[MlxEngine]:
    """A loaded engine whose worker logs each of its steps under `steps_dir`; unloaded after,
    so every step is on file."""
    monkeypatch.setenv(steptrace.ENV, str(steps_dir))
    e = MlxEngine(config, intake=intake)
    await asyncio.to_thread(e.load)
    try:
        yield e
    finally:
        await asyncio.to_thread(e.unload)


def prompts(engine: MlxEngine, n: int) -> list[list[int]]:
    tok = engine.tokenizer
    return [
        tok.apply_chat_template([{"role": "user", "content": "count " + "and more " * (3 * i)}])
        for i in range(n)
    ]


async def test_eight_concurrent_greedy_requests_match_their_solo_runs(engine: MlxEngine) -> None:
    ps = prompts(engine, 8)
    assert len({len(p) for p in ps}) == 8
    alone = [await run(engine, p, GREEDY) for p in ps]
    together = await asyncio.gather(*(run(engine, p, GREEDY) for p in ps))
    assert [t for t, _ in together] == [t for t, _ in alone]
    assert all(d.completion_tokens == 16 for _, d in together)


async def test_seeded_hot_request_in_a_greedy_batch_is_its_own_and_reproducible(
    engine: MlxEngine,
) -> None:
    ps = prompts(engine, 4)
    hot = SamplingParams(max_tokens=16, temperature=2.0, seed=1234)

    async def batch() -> list[tuple[str, Delta]]:
        return await asyncio.gather(
            run(engine, ps[0], GREEDY), run(engine, ps[1], hot), run(engine, ps[2], GREEDY)
        )

    first, second = await batch(), await batch()
    greedy_alone = (await run(engine, ps[1], GREEDY))[0]
    assert first[1][0] != greedy_alone
    assert first[1][0] == second[1][0]
    assert first[0][0] == (await run(engine, ps[0], GREEDY))[0]


async def test_stop_string_ends_only_its_request_and_is_not_emitted(engine: MlxEngine) -> None:
    ps = prompts(engine, 3)
    reference = (await run(engine, ps[1], GREEDY))[0]
    stop = reference[5:8]
    assert stop and stop not in reference[:5]
    stopped = SamplingParams(max_tokens=16, temperature=0, stop=(stop,))
    results = await asyncio.gather(
        run(engine, ps[0], GREEDY), run(engine, ps[1], stopped), run(engine, ps[2], GREEDY)
    )
    text, last = results[1]
    assert (last.finish_reason, last.stop) == ("stop", stop)  # and which stop string it was
    assert text == reference[: reference.index(stop)]
    assert stop not in text
    assert all(d.finish_reason == "length" and d.completion_tokens == 16 for _, d in results[::2])


async def test_a_sequence_whose_text_hit_a_stop_string_leaves_the_batch_within_a_few_steps(
    engine: MlxEngine,
) -> None:
    p = prompts(engine, 1)[0]
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    reference, lengths = "", []  # the text's length after each token
    # With logprobs every token comes as a delta of its own, those without text too.
    each = replace(long, max_tokens=40, logprobs=True)
    async for d in engine.stream(GenerationRequest(p, each)):
        reference += d.text
        lengths.append(len(reference))
    stop = reference[5:8]
    assert stop and stop not in reference[:7]
    tokens_to_stop = next(n for n, length in enumerate(lengths, 1) if length >= 8)
    await until(lambda: engine.stats().active == 0)
    steps_before = engine.stats().steps

    text, last = await run(engine, p, replace(long, stop=(stop,)))
    assert (text, last.finish_reason) == (reference[: reference.index(stop)], "stop")
    await until(lambda: engine.stats().active == 0)
    # Its prefill, its tokens up to the stop, and the few steps the worker's output thread may
    # lag behind the batch (_OUTPUT_LAG): far from the 400 its max_tokens allows.
    assert engine.stats().steps - steps_before <= tokens_to_stop + 5


async def generating(engine: MlxEngine, prompt: list[int]) -> AsyncIterator[Delta]:
    """A stream of a long generation, three deltas in: its sequence is in the batch."""
    long = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
    stream = engine.stream(GenerationRequest(prompt, long))
    for _ in range(3):
        await anext(stream)
    return stream


async def cancel(engine: MlxEngine, stream: AsyncIterator[Delta]) -> float:
    """Close `stream` (the client is gone) and wait until its sequence has left the batch (or a
    second); when it was closed (time.perf_counter, the steps' clock)."""
    sent = time.perf_counter()
    await stream.aclose()  # type: ignore[attr-defined]
    for _ in range(200):
        if engine.stats().active == 0:
            break
        await asyncio.sleep(0.005)
    assert engine.stats().active == 0
    return sent


# The steps a cancelled sequence may take after the cancel was sent: the worker's reader thread
# waits for the GIL, which the stepping thread holds, before the cancel is the worker's. On the
# 2-core CPU at most two steps began meanwhile, in 400 cancels (200 with both cores busy). A cancel
# that waits for anything else (the sequence's end, a burst's hold) takes hundreds.
CANCEL_STEPS = 4


def assert_left_within_a_step(steps_dir: Path, sent: float, until: float = math.inf) -> None:
    """The batch's only sequence, cancelled at `sent`, took at most the step that began as the
    worker had the cancel (it is applied before the next), and a few while it was on its way;
    `until`: when the next sequence came."""
    trace = TraceReader(steps_dir)
    (reached,) = (a.t for a in trace.arrivals(sent, until) if a.at == "cancel")
    assert sum(1 for s in trace.steps(reached, until) if s.decoded) <= 1
    assert sum(1 for s in trace.steps(sent, until) if s.decoded) <= CANCEL_STEPS


async def test_a_cancelled_stream_leaves_the_batch_within_a_step_and_no_step_follows(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    starts, sents = [], []
    async with traced_engine(
        LoadConfig(model_id="x", path=tiny_model_dir), tmp_path, monkeypatch
    ) as e:
        for p in prompts(e, 3):  # three cancels, each of the batch's only sequence
            starts.append(time.perf_counter())
            stream = await generating(e, p)
            assert e.stats().active == 1
            sents.append(await cancel(e, stream))
            assert e.stats().in_flight == 0
    for sent, next_start in zip(sents, [*starts[1:], math.inf], strict=True):
        assert_left_within_a_step(tmp_path, sent, next_start)
    # An emptied batch took no step of its own.
    steps = TraceReader(tmp_path).steps(0.0, math.inf)
    assert steps and all(s.decoded or s.prompted or s.started for s in steps)


async def test_ignore_eos_and_min_tokens_run_to_max_tokens(engine: MlxEngine) -> None:
    p = prompts(engine, 1)[0]
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True, min_tokens=24)
    _, last = await run(engine, p, params)
    assert last.completion_tokens == 24 and last.finish_reason == "length"


async def test_logit_bias_forces_a_token(engine: MlxEngine) -> None:
    p = prompts(engine, 1)[0]
    target = engine.tokenizer.encode(" the")[0]
    params = SamplingParams(max_tokens=4, temperature=0, logit_bias={target: 100.0})
    text, _ = await run(engine, p, params)
    assert text == engine.tokenizer.decode([target] * 4)


async def test_special_tokens_stay_out_of_the_text_but_the_parsers_markup_stays(
    engine: MlxEngine,
) -> None:
    p = prompts(engine, 1)[0]
    tok = engine.tokenizer
    im_end, tool_call = tok.encode("<|im_end|>"), tok.encode("<tool_call>")
    assert len(im_end) == len(tool_call) == 1  # one special token, one markup token
    # Past an ignored EOS the model writes chat markup: it is counted, not shown.
    forced = SamplingParams(
        max_tokens=3, temperature=0, ignore_eos=True, logit_bias={im_end[0]: 100}
    )
    text, last = await run(engine, p, forced)
    assert text == "" and last.completion_tokens == 3
    forced = replace(forced, logit_bias={tool_call[0]: 100.0})
    text, _ = await run(engine, p, forced)
    assert text == "<tool_call>" * 3


async def tokens_of(engine: MlxEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    made: list[int] = []
    async for d in engine.stream(GenerationRequest(prompt, params)):
        made += d.token_ids
    return made


async def test_a_thinking_budget_writes_the_blocks_end_for_the_model(engine: MlxEngine) -> None:
    p = prompts(engine, 1)[0]
    (think,), (done,) = engine.tokenizer.encode("<think>"), engine.tokenizer.encode("</think>")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    free = await tokens_of(engine, [*p, think], params)
    assert done not in free  # left alone, the model does not end its block this soon
    budgeted = await tokens_of(engine, [*p, think], replace(params, thinking_budget=3))
    assert budgeted[:4] == [*free[:3], done] and budgeted.count(done) == 1
    # A prompt that opens no block, an answer that opens none: nothing to end.
    plain = await tokens_of(engine, p, params)
    assert think not in plain
    assert await tokens_of(engine, p, replace(params, thinking_budget=0)) == plain
    # Under a grammar the answer is the grammar's from its first token, whatever the prompt opened.
    constrained = replace(params, ignore_eos=False, max_tokens=12)
    request = GenerationRequest([*p, think], constrained, Constraint(grammars.json_object().text))
    free = [t async for d in engine.stream(request) for t in d.token_ids]
    budgeted = replace(request, params=replace(constrained, thinking_budget=0))
    assert [t async for d in engine.stream(budgeted) for t in d.token_ids] == free


async def test_a_thinking_budget_ends_a_harmony_analysis_message(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """gpt-oss's reasoning opens with several tokens (<|channel|>analysis<|message|>) and ends
    with <|end|>: the worker finds them in the vocabulary and writes the end for the model."""
    path = harmony_model(tiny_model_dir, tmp_path / "harmony")
    engine = MlxEngine(LoadConfig(model_id="h", path=path, prompt_cache_bytes=0))
    await asyncio.to_thread(engine.load)
    try:
        tok = engine.tokenizer
        assert tok.tool_parser == "harmony"
        ids = {name: tok.encode(name)[-1] for name in HARMONY_NAMES.values()}
        turn = [*tok.encode("Hello"), ids["<|start|>"], *tok.encode("assistant")]
        opened = [*turn, ids["<|channel|>"], *tok.encode("analysis"), ids["<|message|>"]]
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        free = await tokens_of(engine, opened, params)
        end = ids["<|end|>"]
        assert end not in free  # the tiny model never writes markup of its own
        budgeted = await tokens_of(engine, opened, replace(params, thinking_budget=3))
        assert budgeted[:4] == [*free[:3], end] and budgeted.count(end) == 1
        # Its answer opened no analysis message: nothing to end.
        plain = await tokens_of(engine, turn, params)
        assert await tokens_of(engine, turn, replace(params, thinking_budget=0)) == plain
    finally:
        await asyncio.to_thread(engine.unload)


async def test_eos_is_never_emitted_before_min_tokens(engine: MlxEngine) -> None:
    p = prompts(engine, 1)[0]
    eos = min(engine.tokenizer.eos_token_ids)
    # A huge bias makes EOS the only choice: min_tokens must still hold it back.
    params = SamplingParams(max_tokens=10, temperature=0, logit_bias={eos: 100.0}, min_tokens=5)
    _, last = await run(engine, p, params)
    assert last.finish_reason == "stop" and last.completion_tokens == 6


@pytest.mark.parametrize(
    ("prompt_tail", "params", "param"),
    [
        ([2048], GREEDY, "prompt"),  # the tiny model's vocabulary is 0-2047
        ([-5], GREEDY, "prompt"),
        ([], replace(GREEDY, logit_bias={99_999_999: 5.0}), "logit_bias"),
        ([], replace(GREEDY, logit_bias={-3: 5.0}), "logit_bias"),
        ([], replace(GREEDY, stop_token_ids=(4096,)), "stop_token_ids"),
    ],
)
async def test_a_token_id_outside_the_vocabulary_is_refused_and_the_worker_serves_on(
    engine: MlxEngine, prompt_tail: list[int], params: SamplingParams, param: str
) -> None:
    """Such an id would index past the embedding or the logits: the worker crashed on it."""
    p = prompts(engine, 1)[0]
    with pytest.raises(RequestError, match="outside the model's vocabulary") as info:
        await run(engine, p + prompt_tail, params)
    assert info.value.param == param
    _, last = await run(engine, p, GREEDY)
    assert last.finish_reason in ("stop", "length") and engine.state is EngineState.READY


async def test_a_scored_prompt_has_each_tokens_logprob_and_goes_on_as_it_would(
    engine: MlxEngine, tiny_model_dir: Path
) -> None:
    p = engine.tokenizer.encode("count " + "and more " * 150)
    assert len(p) > 256  # more than one scoring pass (mlx_worker._SCORE_CHUNK)
    scored = replace(GREEDY, logprobs=True, top_logprobs=3, prompt_logprobs=True)
    deltas = [d async for d in engine.stream(GenerationRequest(p, scored))]
    lps = [lp for d in deltas for lp in d.prompt_logprobs]
    # As the model gives them, the whole prompt in one pass.
    model, _ = mlx_lm.load(str(tiny_model_dir))
    logits = model(mx.array(p)[None])[0].astype(mx.float32)
    reference = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    assert [lp.token for lp in lps] == [engine.tokenizer.decode([t]) for t in p[1:]]
    for i, lp in enumerate(lps, start=1):
        assert lp.logprob == pytest.approx(reference[i - 1, p[i]].item(), abs=1e-4)
        assert len(lp.top) == 3 and lp.top[0][1] >= max(lp.logprob, lp.top[2][1])
    # The pass that scored the prompt filled its cache: the continuation is the unscored one.
    text, last = await run(engine, p, GREEDY)
    assert "".join(d.text for d in deltas) == text
    assert last.completion_tokens == deltas[-1].completion_tokens == 16
    # No tokens asked for: the scores alone, in one delta.
    (only,) = [d async for d in engine.stream(GenerationRequest(p, replace(scored, max_tokens=0)))]
    assert only.finish_reason == "length" and only.completion_tokens == 0
    assert only.prompt_logprobs == tuple(lps)


async def test_logprobs_under_a_grammar_are_finite(engine: MlxEngine) -> None:
    # Tokens the grammar forbids have probability 0: JSON cannot carry their -inf (a 500 before).
    p = prompts(engine, 1)[0]
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    request = GenerationRequest(p, params, Constraint(grammars.json_object().text))
    lps = [lp async for d in engine.stream(request) for lp in d.logprobs]
    values = [lp.logprob for lp in lps] + [v for lp in lps for _, v, _ in lp.top]
    assert lps and all(-9999.0 <= v <= 0.0 for v in values)
    assert any(v == -9999.0 for v in values)  # the grammar did forbid some of the top 3


async def test_the_stop_token_that_ends_an_answer_has_no_logprob(engine: MlxEngine) -> None:
    # Its text is left out of the answer, and so is its logprob (OpenAI's logprobs end with the
    # answer's last token); it still counts as a completion token.
    p = prompts(engine, 1)[0]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=True)
    free = [d async for d in engine.stream(GenerationRequest(p, params))]
    ids = [t for d in free for t in d.token_ids]
    stopper = replace(params, ignore_eos=False, stop_token_ids=(ids[3],))
    end = ids.index(ids[3])  # where it ends: the first time that token comes
    deltas = [d async for d in engine.stream(GenerationRequest(p, stopper))]
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == end + 1
    lps = [lp for d in deltas for lp in d.logprobs]
    assert lps == [lp for d in free for lp in d.logprobs][:end]


async def test_a_top_k_past_the_vocabulary_filters_nothing(engine: MlxEngine) -> None:
    p = prompts(engine, 1)[0]
    hot = SamplingParams(max_tokens=8, temperature=1.5, seed=11)
    unfiltered, _ = await run(engine, p, hot)
    text, last = await run(engine, p, replace(hot, top_k=5000))
    assert text == unfiltered and last.finish_reason in ("stop", "length")


async def test_prompt_cache_reuses_a_conversation_prefix(tiny_model_dir: Path) -> None:
    e = MlxEngine(LoadConfig(model_id="c", path=tiny_model_dir, prompt_cache_bytes=64 * 2**20))
    await asyncio.to_thread(e.load)
    try:
        tok = e.tokenizer
        turn1 = [{"role": "user", "content": "tell me a long story about the sea"}]
        p1 = tok.apply_chat_template(turn1)
        answer, first = await run(e, p1, GREEDY)
        assert first.cached_tokens == 0
        # Stored after its last token went out; the worker reports it, though no step follows.
        await until(lambda: e.stats().prompt_cache_bytes > 0)
        turn2 = [
            *turn1,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "more"},
        ]
        _, second = await run(e, tok.apply_chat_template(turn2), GREEDY)
        assert second.cached_tokens >= len(p1) - 1
        assert e.stats().prompt_cache_bytes > 0
        assert e.resident_bytes() >= e.stats().prompt_cache_bytes
    finally:
        await asyncio.to_thread(e.unload)


async def test_conversations_that_end_in_one_step_each_reuse_their_own_prefix(
    tiny_model_dir: Path,
) -> None:
    """A round of first turns that started together ends in one step, whose caches the worker
    stores together: each second turn finds its own first turn's cache."""
    e = MlxEngine(LoadConfig(model_id="r", path=tiny_model_dir, prompt_cache_bytes=64 * 2**20))
    await asyncio.to_thread(e.load)
    try:
        tok = e.tokenizer
        turns = [[{"role": "user", "content": f"story {i}: " + "waves " * i}] for i in range(4)]
        firsts = [tok.apply_chat_template(t) for t in turns]
        same_length = replace(GREEDY, max_tokens=8, ignore_eos=True)
        answers = await asyncio.gather(*(run(e, p, same_length) for p in firsts))
        await until(lambda: e.stats().prompt_cache_bytes > 0)
        seconds = [
            tok.apply_chat_template(
                [*t, {"role": "assistant", "content": a}, {"role": "user", "content": "more"}]
            )
            for t, (a, _) in zip(turns, answers, strict=True)
        ]
        for p1, p2 in zip(firsts, seconds, strict=True):
            _, last = await run(e, p2, GREEDY)
            assert last.cached_tokens >= len(p1) - 1
    finally:
        await asyncio.to_thread(e.unload)


async def test_the_prompt_cache_holds_no_more_memory_than_it_reports(tiny_model_dir: Path) -> None:
    """Each finished sequence's cache is cut out of the batch's KV buffers: the worker's memory
    beyond the weights stays near what the prompt cache counts, not the buffers it was cut from."""
    e = MlxEngine(LoadConfig(model_id="p", path=tiny_model_dir, prompt_cache_bytes=64 * 2**20))
    await asyncio.to_thread(e.load)
    try:
        ps = prompts(e, 8)
        # Ending at eight different steps: eight generations of the batch's buffers.
        await asyncio.gather(
            *(run(e, p, replace(GREEDY, max_tokens=4 + 3 * i)) for i, p in enumerate(ps))
        )
        await run(e, ps[0][:2], replace(GREEDY, max_tokens=1))  # a step after the round's last
        s = e.worker_stats
        assert s is not None and s.prompt_cache_bytes > 0
        cfg = json.loads((tiny_model_dir / "config.json").read_text())
        per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
        # Slack for the last request's own buffers (256 slots each) and small arrays. Before the
        # worker computed each cut-out cache: 3.9 MB held for 0.19 MB counted.
        slack = 4 * 256 * per_token
        assert s.mlx_active_bytes - s.weights_bytes <= s.prompt_cache_bytes + slack
    finally:
        await asyncio.to_thread(e.unload)


async def test_full_queue_is_refused_and_context_overflow_names_the_limit(
    tiny_model_dir: Path,
) -> None:
    e = MlxEngine(LoadConfig(model_id="q", path=tiny_model_dir, max_batch=1, max_queue=1))
    await asyncio.to_thread(e.load)
    try:
        p = prompts(e, 1)[0]
        # Queued as they are asked for, before their first delta: the queue is full at once.
        busy = [e.stream(GenerationRequest(p, SamplingParams(max_tokens=500))) for _ in range(2)]
        assert e.stats().in_flight == 2
        with pytest.raises(QueueFull) as full:
            e.stream(GenerationRequest(p, GREEDY))
        assert full.value.delay_s == 1.0  # none has ended yet to tell how long places take
        # One closed before it was ever read frees its place (and leaves the batch).
        await busy.pop().aclose()
        assert e.stats().in_flight == 1
        busy.append(e.stream(GenerationRequest(p, SamplingParams(max_tokens=500))))
        for s in busy:
            await anext(s)
            await s.aclose()
        await until(lambda: e.stats().active == 0)
        assert e.stats().in_flight == 0
        with pytest.raises(RequestError, match="maximum context length is 4096") as info:
            e.stream(GenerationRequest(p, SamplingParams(max_tokens=5000)))
        assert info.value.param == "max_tokens"
    finally:
        await asyncio.to_thread(e.unload)


async def test_places_held_for_a_request_on_its_way_are_its_own(tiny_model_dir: Path) -> None:
    # The API holds a request's places as it arrives, while its prompt is built on a thread: a
    # later request whose prompt was quicker to build must not take them.
    e = MlxEngine(LoadConfig(model_id="h", path=tiny_model_dir, max_batch=1, max_queue=2))
    await asyncio.to_thread(e.load)
    streams: list[AsyncIterator[Delta]] = []
    try:
        p = prompts(e, 1)[0]
        long = SamplingParams(max_tokens=500)
        streams.append(e.stream(GenerationRequest(p, long)))
        await anext(streams[0])
        with e.hold("first", 2):
            with pytest.raises(QueueFull), e.hold("later", 1):
                pass
            with pytest.raises(QueueFull):
                await anext(e.stream(GenerationRequest(p, long, request_id="later")))
            streams += [e.stream(GenerationRequest(p, long, request_id="first")) for _ in range(2)]
            for s in streams[1:]:
                await anext(s)
        assert e.stats().in_flight == 3  # its places became its streams', none freed twice
        with pytest.raises(QueueFull):
            await anext(e.stream(GenerationRequest(p, long)))
        while streams:
            await streams.pop().aclose()  # type: ignore[attr-defined]
        # Places it did not fill are free again after the block.
        with e.hold("gone", 3), pytest.raises(QueueFull):
            await anext(e.stream(GenerationRequest(p, long)))
        streams.append(e.stream(GenerationRequest(p, long)))
        await anext(streams[-1])
        # More places than the queue has at all: none, for the API to refuse it with a 400.
        with e.hold("huge", 4):
            streams.append(e.stream(GenerationRequest(p, long)))
            await anext(streams[-1])
        while streams:
            await streams.pop().aclose()  # type: ignore[attr-defined]
        # An embedding fills a place held for it as a stream does.
        with e.hold("others", 2), e.hold("rows", 1):
            with pytest.raises(QueueFull):
                await e.embed([p])
            assert (await e.embed([p], "rows")).count == 1
    finally:
        for s in streams:
            await s.aclose()  # type: ignore[attr-defined]
        await asyncio.to_thread(e.unload)


async def test_a_request_behind_a_full_batch_reports_its_wait_in_the_queue(
    tiny_model_dir: Path,
) -> None:
    e = MlxEngine(LoadConfig(model_id="w", path=tiny_model_dir, max_batch=1))
    await asyncio.to_thread(e.load)
    try:
        p = prompts(e, 1)[0]
        long = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)

        async def timed(params: SamplingParams) -> tuple[Delta, float]:
            """The first delta and the time from it to the last one."""
            first: tuple[Delta, float] | None = None
            async for d in e.stream(GenerationRequest(p, params)):
                now = asyncio.get_running_loop().time()
                first = first or (d, now)
            assert first is not None
            return first[0], now - first[1]

        (head, head_span), (waiter, _) = await asyncio.gather(timed(long), timed(GREEDY))
        assert head.queue_s is not None and waiter.queue_s is not None
        assert waiter.prefill_s is not None and waiter.prefill_s > 0
        # One slot: the second waits while the first generates its 64 tokens.
        assert waiter.queue_s > max(head.queue_s, head_span / 2)
    finally:
        await asyncio.to_thread(e.unload)


async def test_an_engine_holds_a_request_while_its_burst_is_still_being_prepared(
    tiny_model_dir: Path,
) -> None:
    intake = Intake(max_hold_s=10.0)
    e = MlxEngine(LoadConfig(model_id="i", path=tiny_model_dir), intake=intake)
    await asyncio.to_thread(e.load)
    try:
        p = prompts(e, 1)[0]
        loop = asyncio.get_running_loop()

        async def request(prepare_s: float) -> tuple[float, float, Delta]:
            """As the API serves one: prepared for `prepare_s`, then streamed.
            When it reached the engine, when its first delta came, that delta."""
            with intake.preparing():
                await asyncio.sleep(prepare_s)
                reached = loop.time()
                stream = e.stream(GenerationRequest(p, GREEDY))
                first = await anext(stream)
                await stream.aclose()  # type: ignore[attr-defined]
                return reached, loop.time(), first

        (a_reached, a_first_at, a), (b_reached, _, b) = await asyncio.gather(
            request(0.0), request(0.3)
        )
        # The first reached its engine at once, yet went to the worker with the second...
        assert b_reached - a_reached >= 0.3
        assert a_first_at >= b_reached
        # ...and both then started at once (the worker saw no wait).
        assert a.queue_s is not None and b.queue_s is not None
        assert a.queue_s < 0.2 and b.queue_s < 0.2
    finally:
        await asyncio.to_thread(e.unload)


async def test_an_idle_worker_waits_for_a_burst_the_daemon_is_still_preparing(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(steptrace.ENV, str(tmp_path))
    intake = Intake()  # the API's: a hold lasts 25 ms at most
    e = MlxEngine(LoadConfig(model_id="b", path=tiny_model_dir), intake=intake)
    await asyncio.to_thread(e.load)
    try:
        ps = prompts(e, 6)
        short = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)

        async def request(k: int) -> None:
            """Six come at once, and the event loop prepares them one after another, 12 ms
            each: the last reaches the engine after 60 ms, long after the intake let go."""
            with intake.preparing():
                await asyncio.sleep(0.012 * k)
                await run(e, ps[k], short)

        start = time.perf_counter()
        await asyncio.gather(*(request(k) for k in range(6)))
    finally:
        await asyncio.to_thread(e.unload)
    steps = TraceReader(tmp_path).steps(start, math.inf)
    assert [s.prompted for s in steps if s.prompted] == [6]
    # Each request logged where it arrived: the API (here the test), its engine, the worker
    # (the daemon's side reaches the disk 50 ms after its latest record).
    expected = {"api": 6, "engine": 6, "worker": 6}
    await until(
        lambda: Counter(a.at for a in TraceReader(tmp_path).arrivals(start, math.inf)) == expected
    )
    arrivals = TraceReader(tmp_path).arrivals(start, math.inf)
    engine_at = [a.t for a in arrivals if a.at == "engine"]
    assert max(engine_at) - min(engine_at) >= 0.05  # 12 ms apart, as prepared


@pytest.mark.parametrize(
    ("other_model", "other_prepare_s"),
    [
        # Not yet named (being parsed; or a 400 to come): waited for until it was done, 40 ms
        # from the start (15 after the intake let this one go), not 150 ms.
        (None, 0.04),
        # Named for another model, still loading (300 ms): not waited for at all.
        ("another", 0.3),
    ],
)
async def test_an_idle_worker_waits_only_for_requests_that_may_be_its_own(
    tiny_model_dir: Path, other_model: str | None, other_prepare_s: float
) -> None:
    intake = Intake()
    e = MlxEngine(LoadConfig(model_id="w", path=tiny_model_dir), intake=intake)
    await asyncio.to_thread(e.load)
    try:
        p = prompts(e, 1)[0]

        async def elsewhere() -> None:
            """A request prepared beside it that never comes here."""
            with intake.preparing():
                if other_model is not None:
                    intake.concerns(other_model)
                await asyncio.sleep(other_prepare_s)

        async def here() -> Delta:
            with intake.preparing():
                intake.concerns("w")
                stream = e.stream(GenerationRequest(p, GREEDY))
                first = await anext(stream)
                await stream.aclose()  # type: ignore[attr-defined]
                return first

        first, _ = await asyncio.gather(here(), elsewhere())
        assert first.queue_s is not None and first.queue_s < 0.1
    finally:
        await asyncio.to_thread(e.unload)


@pytest.mark.parametrize(
    ("ended", "coming_back", "apart_s"), [(3, 3, 0.004), (3, 2, 0.004), (4, 4, 0.025)]
)
async def test_requests_that_follow_a_round_of_endings_start_in_one_prefill(
    ended: int,
    coming_back: int,
    apart_s: float,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = LoadConfig(model_id="f", path=tiny_model_dir)
    async with traced_engine(config, tmp_path, monkeypatch) as e:
        ps = prompts(e, ended + coming_back)
        fixed = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        await asyncio.gather(*(run(e, p, fixed) for p in ps[:ended]))  # they end in one step
        next_round = time.perf_counter()
        # The next ones, `apart_s` apart as closed-loop clients' requests come over HTTP: more
        # than the pause a burst from an idle start waits for; 25 ms apart, as the intake's
        # holds may space them, the round spreads over 75 ms. Where one of those that ended
        # does not come back, the others go once no more come.
        back = ps[ended:]
        await asyncio.gather(*(run_after(e, apart_s * k, p, fixed) for k, p in enumerate(back)))
    steps = TraceReader(tmp_path).steps(next_round, math.inf)
    # One prefill, then they start.
    assert [s.prompted for s in steps if s.prompt_work] == [coming_back, 0]
    assert sum(s.started for s in steps) == coming_back


async def test_the_step_a_round_ends_in_logs_the_time_its_caches_took_each_its_cpu_time(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = LoadConfig(model_id="s", path=tiny_model_dir)
    async with traced_engine(config, tmp_path, monkeypatch) as e:
        fixed = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        await asyncio.gather(*(run(e, p, fixed) for p in prompts(e, 4)))  # they end in one step
        await until(lambda: e.stats().prompt_cache_bytes > 0)
    steps = TraceReader(tmp_path).steps(0.0, math.inf)
    last = max((s for s in steps if s.decoded), key=lambda s: s.t)
    assert last.decoded == 4
    assert 0 < last.cache_ms <= last.after_ms
    assert all(s.cache_ms == 0 for s in steps if s is not last)  # nothing ended there
    # The stepping thread's CPU time in each step, its wall time at most (read inside it; the
    # slack for the two clocks' rates, which differ by parts per million).
    assert [s for s in steps if not 0 < s.cpu_ms <= s.ms + 0.05] == []
    # And its context switches in it, where the system counts them per thread.
    if switches() is not None:
        assert [s for s in steps if not (s.blocked >= 0 and s.preempted >= 0)] == []


async def test_followers_join_a_running_batch_in_one_prefill(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = LoadConfig(model_id="r", path=tiny_model_dir)
    async with traced_engine(config, tmp_path, monkeypatch) as e:
        ps = prompts(e, 7)
        long = SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
        running = e.stream(GenerationRequest(ps[0], long))
        await anext(running)
        fixed = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        await asyncio.gather(*(run(e, p, fixed) for p in ps[1:4]))  # three that end in one step
        next_round = time.perf_counter()
        # Their followers come 4 ms apart while the long one decodes on, a step or more apart.
        await asyncio.gather(*(run_after(e, 0.004 * k, p, fixed) for k, p in enumerate(ps[4:])))
        await running.aclose()  # type: ignore[attr-defined]
    steps = TraceReader(tmp_path).steps(next_round, math.inf)
    assert [s.prompted for s in steps if s.prompted] == [3]
    prefill = next(s for s in steps if s.prompted)
    assert any(s.decoded and s.t < prefill.t for s in steps)  # the long one went on meanwhile


async def test_endings_already_followed_do_not_hold_the_next_round(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with traced_engine(
        LoadConfig(model_id="h", path=tiny_model_dir), tmp_path, monkeypatch
    ) as e:
        ps = prompts(e, 10)
        short = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        await asyncio.gather(*(run(e, p, short) for p in ps[:3]))
        await asyncio.gather(*(run(e, p, short) for p in ps[3:6]))  # these follow the first three
        third_round = time.perf_counter()
        # Three follow the second round; a fourth comes 15 ms later, within the gap a round's
        # followers are waited for: counting the first round's endings too would take it in.
        delays = (0.0, 0.004, 0.008, 0.023)
        await asyncio.gather(
            *(run_after(e, d, p, short) for d, p in zip(delays, ps[6:], strict=True))
        )
    steps = TraceReader(tmp_path).steps(third_round, math.inf)
    assert next(s.prompted for s in steps if s.prompted) == 3


async def test_the_sequences_of_one_request_end_as_one_request(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = LoadConfig(model_id="n", path=tiny_model_dir, prompt_cache_bytes=0)
    async with traced_engine(config, tmp_path, monkeypatch) as e:
        ps = prompts(e, 3)
        short = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        # One client request with three choices (n=3): its sequences share a request_id.
        await asyncio.gather(*(run(e, ps[0], short, request_id="req-n3") for _ in range(3)))
        next_round = time.perf_counter()
        # One request follows it, and an unrelated one comes 30 ms later, within the gap a
        # round's followers are waited for: counted as three endings, the first would wait for it.
        await asyncio.gather(run(e, ps[1], short), run_after(e, 0.03, ps[2], short))
    steps = TraceReader(tmp_path).steps(next_round, math.inf)
    assert [s.started for s in steps if s.started] == [1, 1]


async def test_a_burst_of_short_prompts_is_prefilled_in_one_step(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = LoadConfig(model_id="g", path=tiny_model_dir, max_batch=16)
    async with traced_engine(config, tmp_path, monkeypatch) as e:
        started = time.perf_counter()
        done = await asyncio.gather(*(run(e, p, GREEDY) for p in prompts(e, 12)))
    assert all(d.completion_tokens == 16 for _, d in done)
    steps = TraceReader(tmp_path).steps(started, math.inf)
    # Twelve, more than the eight long prompts a group is sized for, in one forward pass.
    assert [s.prompted for s in steps if s.prompted] == [12]


async def test_a_cancel_is_not_held_with_a_burst(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    intake = Intake(max_hold_s=10.0)
    others = asyncio.Event()

    async def preparing() -> None:  # another request, being prepared all along
        with intake.preparing():
            await others.wait()

    other: asyncio.Task[None] | None = None
    async with traced_engine(
        LoadConfig(model_id="c", path=tiny_model_dir), tmp_path, monkeypatch, intake
    ) as e:
        try:
            stream = await generating(e, prompts(e, 1)[0])
            other = asyncio.create_task(preparing())
            await asyncio.sleep(0.05)
            sent = await cancel(e, stream)
            assert not other.done()
        finally:  # the other request ends here too, so a failure above leaves no task behind
            others.set()
            if other is not None:
                await other
    assert_left_within_a_step(tmp_path, sent)


@pytest.mark.parametrize(
    "narrowing",
    [{"top_k": 1}, {"top_p": 1e-6}, {"top_p": 0.0}, {"min_p": 1.0}],
    ids=["top_k=1", "top_p~0", "top_p=0", "min_p=1"],
)
async def test_filters_that_leave_one_token_make_hot_sampling_greedy(
    engine: MlxEngine, narrowing: dict[str, float]
) -> None:
    p = prompts(engine, 1)[0]
    greedy = (await run(engine, p, GREEDY))[0]
    hot = SamplingParams(max_tokens=16, temperature=2.0, seed=9, **narrowing)  # type: ignore[arg-type]
    assert (await run(engine, p, hot))[0] == greedy
    assert (await run(engine, p, SamplingParams(max_tokens=16, temperature=2.0, seed=9)))[
        0
    ] != greedy


async def test_penalties_reduce_repetition(engine: MlxEngine) -> None:
    p = prompts(engine, 1)[0]

    async def repeats(params: SamplingParams) -> int:
        req = GenerationRequest(p, params)
        ids = [t async for d in engine.stream(req) for t in d.token_ids]
        return len(ids) - len(set(ids))

    base = dict(max_tokens=48, temperature=0)
    plain = await repeats(SamplingParams(**base))  # type: ignore[arg-type]
    assert plain > 5  # a random model loops when decoded greedily
    for penalty in (
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 1.8},
    ):
        assert await repeats(SamplingParams(**base, **penalty)) < plain, penalty  # type: ignore[arg-type]


async def test_unload_ends_the_worker_process(tiny_model_dir: Path) -> None:
    e = MlxEngine(LoadConfig(model_id="u", path=tiny_model_dir, prompt_cache_bytes=0))
    await asyncio.to_thread(e.load)
    pid = e.pid
    assert pid is not None and psutil.Process(pid).is_running()
    assert mlx_counters()[0] >= e.resident_bytes() > 0
    await asyncio.to_thread(e.unload)
    assert e.pid is None and not psutil.pid_exists(pid)
    assert e.state is EngineState.UNLOADED and e.resident_bytes() == 0


def test_a_worker_gets_the_malloc_tunables_the_environment_leaves_unset() -> None:
    ours = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"
    assert worker_environment({"PATH": "/bin"}) == {
        "PATH": "/bin",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:" + ours,
    }
    given = "glibc.malloc.hugetlb=0:glibc.cpu.x86_shstk=on"
    assert worker_environment({"GLIBC_TUNABLES": given}) == {"GLIBC_TUNABLES": f"{given}:{ours}"}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="no /proc")
async def test_a_worker_process_starts_with_the_malloc_tunables_added(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    e = MlxEngine(LoadConfig(model_id="m", path=tiny_model_dir, prompt_cache_bytes=0))
    await asyncio.to_thread(e.load)
    try:
        # glibc's loader splits the variable's text at its colons where it lies, in place.
        environ = await asyncio.to_thread(Path(f"/proc/{e.pid}/environ").read_bytes)
    finally:
        await asyncio.to_thread(e.unload)
    environ = environ.replace(b"\0", b":")
    assert b":GLIBC_TUNABLES=glibc.malloc.trim_threshold=1048576:glibc.malloc.hugetlb=1:" in environ
    assert b"trim_threshold=268435456" not in environ


def _idle_workers(known: set[int]) -> set[int]:
    """Worker processes of ours not in `known` (spares waiting for a model)."""
    return {
        p.pid
        for p in psutil.Process().children()
        if p.pid not in known and "lmx.runtime.mlx_worker" in " ".join(p.cmdline())
    }


async def _new_worker(known: set[int]) -> int:
    """The one worker process of ours not in `known`. Popen returns once the exec has begun, and
    the kernel fills in a new process's command line a moment later: until then it reads empty."""
    for _ in range(200):
        if new := _idle_workers(known):
            (pid,) = new
            return pid
        await asyncio.sleep(0.01)
    raise AssertionError("no new worker process within 2 s")


async def test_a_load_takes_a_waiting_spare_and_a_new_one_waits_after_it(
    tiny_model_dir: Path,
) -> None:
    before = _idle_workers(set())
    spares = Spares()
    await asyncio.to_thread(spares.refill)
    spare = await _new_worker(before)
    e = MlxEngine(LoadConfig(model_id="s", path=tiny_model_dir), spares=spares)
    try:
        await asyncio.to_thread(e.load)
        assert e.pid == spare
        refill = await _new_worker(before | {spare})
        text, last = await run(e, prompts(e, 1)[0], GREEDY)
        assert last.finish_reason == "length" and text
    finally:
        await asyncio.to_thread(e.unload)
        await asyncio.to_thread(spares.close)
    assert not psutil.pid_exists(spare) and not psutil.pid_exists(refill)


async def test_a_load_is_charged_its_whole_worker_whether_it_took_a_spare_or_not(
    tiny_model_dir: Path,
) -> None:
    # A spare is memory no model takes: left out, a load that takes one is charged the worker's
    # interpreter and MLX as a load that starts its own is, and not the spare started after it.
    # Counted, the same model measured 23-104 MiB from load to load, and a restart's loads (no
    # spare yet) over-charged it until a model that fit was refused as too big.
    before = _idle_workers(set())
    spares = Spares()
    probe = MemoryProbe(idle=spares.pids)
    base = probe.sample().rss_bytes
    await asyncio.to_thread(spares.refill)
    spare = await _new_worker(before)
    await until(lambda: psutil.Process(spare).memory_info().rss > 48 * 2**20, 30)  # MLX in
    assert abs(probe.sample().rss_bytes - base) < 16 * 2**20
    assert MemoryProbe().sample().rss_bytes - base > 48 * 2**20  # the spare, counted
    e = MlxEngine(LoadConfig(model_id="m", path=tiny_model_dir), spares=spares)
    try:
        start = probe.sample()
        await asyncio.to_thread(e.load)
        assert e.pid == spare and spares.pids()  # the next spare started
        took = rise(start, probe.sample()).rss_bytes
        assert took >= psutil.Process(spare).memory_info().rss - 16 * 2**20
    finally:
        await asyncio.to_thread(e.unload)
        await asyncio.to_thread(spares.close)


async def test_a_spare_that_died_waiting_is_replaced_at_the_load(tiny_model_dir: Path) -> None:
    before = _idle_workers(set())
    spares = Spares()
    await asyncio.to_thread(spares.refill)
    spare = await _new_worker(before)
    os.kill(spare, signal.SIGKILL)
    for _ in range(500):  # until it is dead (a zombie: ours to reap)
        if psutil.Process(spare).status() == psutil.STATUS_ZOMBIE:
            break
        await asyncio.sleep(0.01)
    e = MlxEngine(LoadConfig(model_id="d", path=tiny_model_dir), spares=spares)
    try:
        await asyncio.to_thread(e.load)
        assert e.pid not in (None, spare)
        _, last = await run(e, prompts(e, 1)[0], GREEDY)
        assert last.finish_reason == "length"
    finally:
        await asyncio.to_thread(e.unload)
        await asyncio.to_thread(spares.close)
    assert _idle_workers(before) == set()


def _policies(pid: int) -> dict[int, int]:
    """Each thread's scheduling policy in process `pid`."""
    tids = [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    return {tid: os.sched_getscheduler(tid) for tid in tids}


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux's scheduling policies")
async def test_the_workers_output_thread_alone_runs_under_sched_batch(tiny_model_dir: Path) -> None:
    e = MlxEngine(LoadConfig(model_id="b", path=tiny_model_dir))
    await asyncio.to_thread(e.load)
    try:
        _, last = await run(e, prompts(e, 1)[0], GREEDY)
        assert last.finish_reason == "length"
        pid = e.pid
        assert pid is not None
        policies = _policies(pid)
    finally:
        await asyncio.to_thread(e.unload)
    assert policies[pid] == os.SCHED_OTHER  # the stepping thread, and MLX's threads
    assert list(policies.values()).count(os.SCHED_BATCH) == 1


async def test_a_dead_worker_ends_its_streams_with_an_error_and_fails_the_engine(
    tiny_model_dir: Path,
) -> None:
    e = MlxEngine(LoadConfig(model_id="k", path=tiny_model_dir, prompt_cache_bytes=0))
    await asyncio.to_thread(e.load)
    failures: list[str] = []
    e.on_failure = failures.append
    try:
        p = prompts(e, 1)[0]
        stream = e.stream(GenerationRequest(p, SamplingParams(max_tokens=2000, temperature=0)))
        await anext(stream)
        assert e.pid is not None
        os.kill(e.pid, signal.SIGKILL)
        async with asyncio.timeout(30):
            rest = [d async for d in stream]
        assert rest[-1].finish_reason == "error"
        assert (
            rest[-1].error == "the model's worker process exited unexpectedly (killed by SIGKILL)"
        )
        assert not rest[-1].retryable  # failed: not to be asked again as it was
        assert e.state is EngineState.FAILED and failures == [rest[-1].error]
        with pytest.raises(RequestError, match="not ready"):
            await anext(e.stream(GenerationRequest(p, GREEDY)))
    finally:
        await asyncio.to_thread(e.unload)


async def test_an_unload_ends_its_streams_with_an_error_to_ask_again(tiny_model_dir: Path) -> None:
    """Unloaded under them (a drain's deadline, a stop), streams end with an error that the API
    answers 503: the model is loaded again for the retry."""
    e = MlxEngine(LoadConfig(model_id="u", path=tiny_model_dir, prompt_cache_bytes=0))
    await asyncio.to_thread(e.load)
    p = prompts(e, 1)[0]
    stream = e.stream(GenerationRequest(p, SamplingParams(max_tokens=2000, temperature=0)))
    await anext(stream)
    await asyncio.to_thread(e.unload)
    async with asyncio.timeout(30):
        rest = [d async for d in stream]
    assert (rest[-1].finish_reason, rest[-1].error) == ("error", "the model was unloaded")
    assert rest[-1].retryable


async def test_a_load_the_worker_fails_raises_its_error_and_leaves_no_process(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for f in broken.glob("*.safetensors"):
        f.unlink()
    e = MlxEngine(LoadConfig(model_id="b", path=broken))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        await asyncio.to_thread(e.load)
    assert e.state is EngineState.FAILED and e.pid is None
    await asyncio.to_thread(e.unload)  # idempotent after a failed load
    # A JSON file that does not parse is named (the parser's error names no file).
    shutil.rmtree(broken)
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text('{"model_type": "qwen3",\n')
    e = MlxEngine(LoadConfig(model_id="b", path=broken))
    with pytest.raises(ValueError, match=r"broken/config.json is not valid JSON: Expecting"):
        await asyncio.to_thread(e.load)
