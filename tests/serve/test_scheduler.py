"""Continuous batching without Ray: joins and leaves mid-generation, per-request sampling, cancel, queue bound."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from envs import tiny
from envs.models import ModelSettings
from serve.engine import GenerationEngine, InputError
from serve.fused_step import supports_fused
from serve.kv_batch import RunningBatch
from serve.quantize import SERVE_DTYPES
from serve.scheduler import QueueFull, Request, Scheduler, generate


@pytest.fixture(scope="module")
def engine() -> GenerationEngine:
    model, tok = tiny.causal_lm(vocab_size=len(tiny.tokenizer()))
    return GenerationEngine(model, tok, max_tokens_limit=200)


def job(engine, text: str, n: int = 10, temperature: float = 0.0, **kw):
    return engine.make_job(engine.encode_prompt(text), n, temperature=temperature, **kw)


class Sink:
    """Collects what the scheduler emits for one request, with the time of each item."""

    def __init__(self):
        self.items, self.times, self.ended = [], [], threading.Event()

    def __call__(self, item):
        self.items.append(item)
        self.times.append(time.perf_counter())
        if item is None or isinstance(item, BaseException):
            self.ended.set()

    def texts(self, n: int = 1) -> list[str]:
        steps = [s for s in self.items if isinstance(s, list)]
        return ["".join(s[i].text for s in steps if s[i] is not None) for i in range(n)]


def run(scheduler: Scheduler) -> None:
    while scheduler.run_once():
        pass


PROMPTS = ["the film was great", "bad", "I loved the music and the acting", "a boring story about nothing"]


def test_sequences_joining_and_leaving_a_running_batch_match_decoding_alone(engine):
    """Greedy and seeded-sampled sequences admitted at different steps give the text they give alone."""
    jobs = [
        job(engine, PROMPTS[0], 12),
        job(engine, PROMPTS[1], 4, temperature=1.0, top_p=0.9, seed=3),
        job(engine, PROMPTS[2], 9, temperature=0.7, seed=11),
        job(engine, PROMPTS[3], 12, stop=["dull"]),
    ]
    alone = [generate(engine, [j])[0].text for j in jobs]
    s = Scheduler(engine, max_batch_size=4, max_queue=4)
    sinks = [Sink() for _ in jobs]
    for k, (j, sink) in enumerate(zip(jobs, sinks)):
        s.submit(Request([j], sink))
        for _ in range(k + 1):  # join at steps 0, 1, 3, 6 while others are mid-way or done
            s.run_once()
    run(s)
    assert [sink.texts()[0] for sink in sinks] == alone
    assert all(sink.items[-1] is None for sink in sinks)
    assert s.counts.max_rows >= 3 and s.batch.rows == 0 and s.batch.width == 0


def test_n_choices_are_seeded_per_choice_and_batch_independent(engine):
    jobs = [job(engine, PROMPTS[0], 8, temperature=1.0, seed=5 + i) for i in range(3)]
    sink = Sink()
    s = Scheduler(engine, max_batch_size=4, max_queue=4)
    s.submit(Request(jobs, sink))
    run(s)
    assert sink.texts(3) == [generate(engine, [j])[0].text for j in jobs]
    assert len(set(sink.texts(3))) > 1


def test_a_request_arriving_mid_generation_starts_before_the_first_finishes(engine):
    s = Scheduler(engine, max_batch_size=4, max_queue=4)
    s.start()
    try:
        first, second = Sink(), Sink()
        a = Request([job(engine, PROMPTS[0], 150, ignore_eos=True)], first)
        s.submit(a)
        while len(first.items) < 3:
            time.sleep(0.001)
        b = Request([job(engine, PROMPTS[1], 3, ignore_eos=True)], second)
        s.submit(b)
        assert first.ended.wait(30) and second.ended.wait(30)
    finally:
        s.stop()
    a_done = first.times[-1]
    assert a.admitted < b.admitted < a_done
    assert b.first_token < a_done and second.times[-1] < a_done  # b joined, ran and left while a decoded
    assert b.batch_rows == 2


def test_static_batching_waits_for_the_running_batch_to_end(engine):
    s = Scheduler(engine, max_batch_size=4, max_queue=4, mode="static")
    first, second = Sink(), Sink()
    a = Request([job(engine, PROMPTS[0], 6, ignore_eos=True)], first)
    s.submit(a)
    s.run_once()
    b = Request([job(engine, PROMPTS[1], 3, ignore_eos=True)], second)
    s.submit(b)
    steps_while_a_ran = 0
    while a.live:
        s.run_once()
        steps_while_a_ran += 1
    assert b.admitted is None and steps_while_a_ran == 5
    run(s)
    assert second.texts()[0] == generate(engine, [b.jobs[0]])[0].text and b.batch_rows == 1


def test_static_batching_gathers_for_batch_wait_s(engine):
    s = Scheduler(engine, max_batch_size=4, max_queue=4, mode="static", batch_wait_s=60)
    reqs = [Request([job(engine, p, 3)], Sink()) for p in PROMPTS[:2]]
    s.submit(reqs[0])
    assert not s.run_once()  # waits for the batch to fill
    s.submit(reqs[1])
    s.batch_wait_s = 0
    assert s.run_once() and [r.batch_rows for r in reqs] == [2, 2]


def test_cancelling_frees_the_slot_at_the_next_step(engine):
    s = Scheduler(engine, max_batch_size=1, max_queue=1)
    first, second = Sink(), Sink()
    a = Request([job(engine, PROMPTS[0], 150, ignore_eos=True)], first)
    b = Request([job(engine, PROMPTS[1], 3)], second)
    s.submit(a)
    s.run_once()
    s.run_once()
    s.submit(b)
    s.run_once()
    assert b.admitted is None  # the only slot is taken
    s.cancel(a)
    s.run_once()
    assert first.items[-1] is None and len(first.items) == 4  # 3 steps, then the end
    assert b.admitted is not None and s.rows[0].request is b
    run(s)
    assert second.items[-1] is None and s.snapshot().cancelled == 1


def test_a_cancelled_waiting_request_leaves_the_queue(engine):
    s = Scheduler(engine, max_batch_size=1, max_queue=2)
    a, b = Request([job(engine, "bad", 5)], Sink()), Request([job(engine, "bad", 5)], Sink())
    s.submit(a)
    s.submit(b)
    s.run_once()
    s.cancel(b)
    s.run_once()
    assert s.queued == 0 and b.emit.items == [None] and b.admitted is None


def test_queue_bound_and_batch_bound(engine):
    s = Scheduler(engine, max_batch_size=2, max_queue=2)
    s.submit(Request([job(engine, "bad", 5)] * 2, Sink()))
    with pytest.raises(QueueFull) as full:
        s.submit(Request([job(engine, "bad", 5)], Sink()))
    assert 1 <= full.value.retry_after_s <= 60 and s.snapshot().rejected == 1
    with pytest.raises(InputError) as too_many:
        s.submit(Request([job(engine, "bad", 5)] * 3, Sink()))
    assert too_many.value.param == "n"
    s.run_once()  # admitted: the queue has room again
    s.submit(Request([job(engine, "bad", 5)], Sink()))


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(engine, monkeypatch):
    s = Scheduler(engine, max_batch_size=2, max_queue=2)
    broken, healthy = Sink(), Sink()
    s.submit(Request([job(engine, "bad", 5)], broken))
    monkeypatch.setattr(s.batch, "admit", lambda prompts: (_ for _ in ()).throw(RuntimeError("boom")))
    s.run_once()
    assert isinstance(broken.items[-1], RuntimeError) and s.rows == []
    s.submit(Request([job(engine, "bad", 3)], healthy))  # the failure replaced the batch
    run(s)
    assert healthy.items[-1] is None and healthy.texts()[0]


def test_width_shrinks_when_the_longest_row_leaves(engine):
    batch = RunningBatch(engine.model, engine.pad_id)
    long_prompt = engine.encode_prompt(" ".join(["film"] * 30))
    logits = batch.admit([long_prompt, engine.encode_prompt("bad")])
    batch.step(logits.argmax(-1))
    assert batch.width == 31
    batch.keep([1])
    assert batch.width == 2 and batch.cache.layers[0].keys.shape[-2] == 2
    alone = RunningBatch(engine.model, engine.pad_id)
    first = alone.admit([engine.encode_prompt("bad")])
    second = alone.step(first.argmax(-1))
    token = second.argmax(-1)
    assert torch.allclose(batch.step(token), alone.step(token), atol=1e-5)


@pytest.mark.parametrize("dtype", SERVE_DTYPES)
def test_fused_step_and_admit_equals_two_forwards(tiny_policy_dir, dtype):
    """One pass over the weights for a decoding step plus a prefill gives the logits of doing them apart."""
    engine = GenerationEngine.from_spec(ModelSettings(policy=tiny_policy_dir), 16, dtype=dtype)
    assert supports_fused(engine.model)
    # int8 quantises each call's activations with one scale per matrix: other rows change it a little
    tol = {"float32": 1e-5, "bfloat16": 1e-2, "int8": 3e-2}[dtype]
    running = [engine.encode_prompt(p) for p in PROMPTS[:2]]
    new = [engine.encode_prompt(p) for p in PROMPTS[2:]]
    fused, plain = RunningBatch(engine.model, engine.pad_id), RunningBatch(engine.model, engine.pad_id, fuse=False)
    for batch in (fused, plain):
        first = batch.admit(running)
        batch.step(first.argmax(-1))
    token = torch.tensor([5, 9])
    got, want = fused.step_and_admit(token, new), plain.step_and_admit(token, new)
    assert got.shape == (4, want.shape[1]) and torch.allclose(got.float(), want.float(), atol=tol)
    assert torch.equal(fused.mask, plain.mask) and torch.equal(fused.pos, plain.pos)
    after = fused.step(got.argmax(-1)), plain.step(got.argmax(-1))  # the caches agree too
    assert torch.allclose(after[0].float(), after[1].float(), atol=tol)


@pytest.mark.parametrize("fuse", [True, False])
def test_a_long_decode_after_a_row_leaves_matches_one_full_forward(engine, fuse):
    """Seventy steps, the longer row leaving after five (its leading columns trimmed): the logits stay the model's own."""
    batch = RunningBatch(engine.model, engine.pad_id, fuse=fuse)
    prompts = [engine.encode_prompt(" ".join(["good"] * 9)), engine.encode_prompt("bad film")]
    logits = batch.admit(prompts)
    tokens = [list(p) for p in prompts]
    for step in range(70):
        if step == 5:
            batch.keep([1])
            tokens, logits = tokens[1:], logits[1:]
            assert batch.width == len(tokens[0])  # the long row's padding columns are gone
        nxt = logits.argmax(-1)
        for row, t in zip(tokens, nxt.tolist()):
            row.append(t)
        logits = batch.step(nxt)
    with torch.inference_mode():
        want = engine.model(torch.tensor(tokens)).logits[0, -1]
    assert torch.allclose(logits[0], want, atol=1e-4)


SHARED = "the film was a story of a man and a dog and the city they lived in and it was"


@pytest.mark.parametrize("fuse", [True, False])
def test_prompts_sharing_an_earlier_prompts_start_reuse_its_keys_and_match_decoding_alone(engine, fuse):
    """A later prompt that starts like an earlier one prefills only its suffix; its logits are the model's own."""
    first, later = (
        engine.encode_prompt(SHARED + " bad"),
        [engine.encode_prompt(SHARED + e) for e in (" good", " fine and fun")],
    )
    batch = RunningBatch(engine.model, engine.pad_id, fuse=fuse)
    logits = batch.admit([first])
    assert batch.prefix.ids == first
    assert batch.prefix.match(later, own=1) == len(engine.encode_prompt(SHARED)) >= 8
    assert batch.prefix.match([engine.encode_prompt("a different start " + SHARED)], own=1) == 0
    got = batch.step_and_admit(logits.argmax(-1), later)  # one running row, two joining after the shared prefix
    tokens = [first + [int(logits.argmax(-1)[0])], *later]
    for i, row in enumerate(tokens):
        with torch.inference_mode():
            want = engine.model(torch.tensor([row])).logits[0, -1]
        assert torch.allclose(got[i], want, atol=1e-5)
    nxt = got.argmax(-1)
    after = batch.step(nxt)  # and the cached rows (shared columns, padding, suffix) decode on correctly
    for i, row in enumerate(tokens):
        with torch.inference_mode():
            want = engine.model(torch.tensor([row + [int(nxt[i])]])).logits[0, -1]
        assert torch.allclose(after[i], want, atol=1e-5)
