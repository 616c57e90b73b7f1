"""The bridge from the generation loop to the event loop: one wake-up per step, merged backlogs, ordered ends."""

from __future__ import annotations

import asyncio

import pytest

from envs import tiny
from serve.engine import GenerationEngine
from serve.responses import StepStream, merge_steps, outbox
from serve.scheduler import Scheduler, generate

PROMPTS = ["the film was great", "bad", "I loved the music and the acting"]


@pytest.fixture(scope="module")
def engine() -> GenerationEngine:
    model, tok = tiny.causal_lm(vocab_size=len(tiny.tokenizer()))
    return GenerationEngine(model, tok, max_tokens_limit=200)


def jobs(engine, n: int = 2):
    """Seeded sampled and greedy requests of n sequences, 6, 9 and 12 tokens long (so they end at different steps)."""
    return [
        [engine.make_job(engine.encode_prompt(p), 6 + 3 * i, temperature=0.9 * (i % 2), seed=7 + i, ignore_eos=True)]
        * n
        for i, p in enumerate(PROMPTS)
    ]


async def read(stream: StepStream) -> list:
    return [step async for step in stream]


@pytest.mark.parametrize("keep_pace", [True, False])
def test_one_wake_up_per_step_for_all_requests_and_a_late_reader_gets_the_backlog_merged(engine, keep_pace):
    async def main():
        s = Scheduler(engine, max_batch_size=8, max_queue=8)
        streams = [StepStream(s, j) for j in jobs(engine)]
        box = outbox(s)
        assert s.flush_hooks == [box.flush] and outbox(s) is box  # one outbox per event loop
        deliveries, deliver = [], box._deliver
        box._deliver = lambda: (deliveries.append(len(box._items)), deliver())
        for stream in streams:
            stream.submit()
        while s.run_once():  # the loop's steps, driven by hand
            if keep_pace:
                await asyncio.sleep(0)  # the event loop runs between steps
        await asyncio.sleep(0)
        return s, streams, deliveries, [await read(st) for st in streams]

    s, streams, deliveries, read_steps = asyncio.run(main())
    # 12 steps handed 30 items (each request's steps and its end); the event loop woke once per step, or once
    # in all when it was busy the whole time
    assert s.counts.steps == 12 and sum(deliveries) == 7 + 10 + 13
    assert len(deliveries) == (12 if keep_pace else 1)
    for stream, steps, job_list in zip(streams, read_steps, jobs(engine)):
        assert len(steps) == 1  # read after the end: the whole backlog as one step
        want = generate(engine, job_list)
        assert [d.text for d in steps[0]] == [c.text for c in want] == stream.choices.texts
        assert [d.finish_reason for d in steps[0]] == ["length", "length"] == stream.choices.finish
        assert stream.choices.tokens == [job_list[0].max_tokens] * 2
        assert stream.done


def test_merge_steps_joins_texts_and_keeps_the_last_finish():
    from serve.engine import Delta

    steps = [[Delta("a", None, 1), Delta("x", None, 1)], [Delta("b", None, 2), None], [Delta("", "stop", 3), None]]
    merged = merge_steps(steps)
    assert merged[0] == Delta("ab", "stop", 3) and merged[1] == Delta("x", None, 1)
    assert merge_steps([[None, None], [None, None]]) == [None, None]


def test_a_reader_keeps_pace_step_by_step_and_an_error_ends_the_stream(engine):
    async def main():
        s = Scheduler(engine, max_batch_size=8, max_queue=8)
        stream = StepStream(s, jobs(engine)[0])
        stream.submit()
        seen = []
        while s.run_once():
            await asyncio.sleep(0)
            if stream.items and isinstance(stream.items[0], list):
                seen.append(await stream.__anext__())
        tail = await read(stream)
        broken = StepStream(s, jobs(engine)[1])
        broken.submit()
        s.run_once()
        s._fail({broken.request}, RuntimeError("boom"))
        s._flush()
        await asyncio.sleep(0)
        first = await broken.__anext__()  # the step before the error still comes out
        with pytest.raises(RuntimeError, match="boom"):
            await broken.__anext__()
        return seen, tail, first, broken

    seen, tail, first, broken = asyncio.run(main())
    assert len(seen) == 6 and tail == [] and all(len(step) == 2 for step in seen)
    assert ["".join(d.text for d in (step[i] for step in seen) if d) for i in range(2)] == [
        c.text for c in generate(engine, jobs(engine)[0])
    ]
    assert first is not None and broken.done
