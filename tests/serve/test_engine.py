"""The generation engine and one-request generation without Ray: batching, sampling, stop strings, limits, health, dtypes."""

from __future__ import annotations

import pytest
import torch

from envs import tiny
from envs.models import ModelSettings
from envs.packed_linear import PackedLinear, packing_available
from serve.engine import GenerationEngine, GenerationJob, InputError, _held_back, sample_next
from serve.quantize import SERVE_DTYPES
from serve.scheduler import generate, stream


@pytest.fixture(scope="module")
def engine() -> GenerationEngine:
    model, tok = tiny.causal_lm(vocab_size=len(tiny.tokenizer()))
    return GenerationEngine(model, tok, max_tokens_limit=32)


def greedy(engine, text: str, n: int = 10, **kw) -> GenerationJob:
    return engine.make_job(engine.encode_prompt(text), n, temperature=0.0, **kw)


def test_left_padded_batch_equals_one_by_one(engine):
    prompts = ["the film was great", "bad", "I loved the music and the acting"]
    batched = generate(engine, [greedy(engine, p) for p in prompts])
    alone = [generate(engine, [greedy(engine, p)])[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert all(c.text.strip() for c in batched)  # the tiny vocabulary is all words
    assert [c.prompt_tokens for c in batched] == [4, 1, 7]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    def job(seed):
        return engine.make_job(engine.encode_prompt("the film"), 12, temperature=1.0, top_p=0.9, seed=seed)

    a = generate(engine, [job(3)])[0].text
    assert generate(engine, [job(3), job(4)])[0].text == a
    assert any(generate(engine, [job(s)])[0].text != a for s in range(5, 10))


def test_stream_deltas_concatenate_to_the_completion(engine):
    job = greedy(engine, "the film was", 8)
    steps = list(stream(engine, [job]))
    assert len(steps) == 8 and steps[-1][0].finish_reason == "length"
    assert "".join(s[0].text for s in steps) == generate(engine, [job])[0].text
    assert [s[0].completion_tokens for s in steps] == list(range(1, 9))


def test_stop_string_is_cut_and_never_streamed(engine):
    full = generate(engine, [greedy(engine, "the film was", 12)])[0].text
    stop = full.split()[2]
    steps = list(stream(engine, [greedy(engine, "the film was", 12, stop=[stop])]))
    streamed = "".join(s[0].text for s in steps if s[0] is not None)
    assert streamed == full[: full.find(stop)]
    assert steps[-1][0].finish_reason == "stop"


def test_finished_rows_yield_none(engine):
    short, long = greedy(engine, "the film", 2), greedy(engine, "the film", 5)
    steps = list(stream(engine, [short, long]))
    assert len(steps) == 5
    assert steps[1][0].finish_reason == "length" and all(s[0] is None for s in steps[2:])


def test_eos_stops_with_reason_stop(engine):
    job = greedy(engine, "the film", 10)
    first_two = engine.tokenizer(generate(engine, [job])[0].text)["input_ids"][:2]
    saved, engine.eos_ids = engine.eos_ids, {first_two[1]}  # pretend the 2nd greedy token is EOS
    try:
        (done,) = generate(engine, [job])
    finally:
        engine.eos_ids = saved
    assert done.finish_reason == "stop" and done.completion_tokens == 1
    assert done.text == engine.tokenizer.decode(first_two[:1])
    engine.eos_ids = {first_two[1]}
    try:
        (kept,) = generate(engine, [greedy(engine, "the film", 10, ignore_eos=True)])
    finally:
        engine.eos_ids = saved
    assert kept.finish_reason == "length" and kept.completion_tokens == 10


def test_held_back_suffix():
    assert _held_back("the film wa", ["was"]) == 2
    assert _held_back("the film", ["was"]) == 0
    assert _held_back("abc", ["cde", "bcx"]) == 2


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, -5.0, -5.0]])  # p ~ [0.73, 0.27, 0, 0]
    jobs = [GenerationJob(prompt_ids=[1], max_tokens=1, temperature=1.0, top_p=0.5)]
    gens = [torch.Generator().manual_seed(i) for i in range(1)]
    assert {int(sample_next(logits, jobs, gens)[0]) for _ in range(50)} == {0}
    jobs[0].top_p = 0.99
    assert {int(sample_next(logits, jobs, gens)[0]) for _ in range(200)} == {0, 1}


@pytest.mark.parametrize(
    "ids,max_tokens,param,code",
    [
        ([], 4, "prompt", None),
        ([7] * 256, 4, "prompt", "context_length_exceeded"),
        ([7] * 250, 16, "max_tokens", "context_length_exceeded"),
        ([7] * 4, 33, "max_tokens", None),
    ],
)
def test_make_job_rejects_what_the_model_cannot_serve(engine, ids, max_tokens, param, code):
    with pytest.raises(InputError) as err:
        engine.make_job(ids, max_tokens)
    assert err.value.param == param and err.value.code == code


def test_default_max_tokens_fits_the_context(engine):
    assert engine.make_job([7] * 250, None, default_max_tokens=32).max_tokens == 6


def test_chat_prompt_uses_the_template(engine):
    ids = engine.encode_chat([{"role": "user", "content": "the film"}])
    assert engine.tokenizer.decode(ids) == "<|user|> the film <|assistant|>"


def test_health_check_reports_a_broken_model():
    model, tok = tiny.causal_lm(vocab_size=len(tiny.tokenizer()))
    engine = GenerationEngine(model, tok, max_tokens_limit=8)
    engine.check_health()
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="not finite"):
        engine.check_health()


@pytest.mark.slow
def test_smollm2_chat_through_the_engine():
    engine = GenerationEngine.from_spec(ModelSettings(policy="smollm2"), max_tokens_limit=64)
    ids = engine.encode_chat([{"role": "user", "content": "Say hello in one word."}])
    assert engine.tokenizer.decode(ids).rstrip().endswith("<|im_start|>assistant")
    jobs = [engine.make_job(ids, 48, temperature=0.0), engine.make_job(engine.encode_prompt("The movie was"), 8)]
    chat, completion = generate(engine, jobs)
    assert chat.text.strip() and "<|im_end|>" not in chat.text
    assert chat.finish_reason == "stop"  # an instruct model ends its turn with <|im_end|>
    assert completion.completion_tokens <= 8


@pytest.mark.parametrize("dtype", SERVE_DTYPES)
def test_each_dtype_loads_an_exported_policy_and_generates(tiny_policy_dir, dtype):
    spec = ModelSettings(policy=tiny_policy_dir)
    engine = GenerationEngine.from_spec(spec, max_tokens_limit=16, dtype=dtype)
    reference = GenerationEngine.from_spec(spec, max_tokens_limit=16, pack_weights=False)
    q_proj = engine.model.model.layers[0].self_attn.q_proj
    if dtype == "int8":
        assert (
            type(q_proj).__module__.startswith("torch.ao.nn.quantized")
            and "quantized" in type(engine.model.lm_head).__module__
        )
    elif packing_available(getattr(torch, dtype)):  # float32 and bfloat16: packed Linear layers in a float32 model
        assert isinstance(q_proj, PackedLinear) and isinstance(engine.model.lm_head, PackedLinear)
        assert q_proj.packed.dtype == q_proj.matmul_dtype == getattr(torch, dtype)
        assert engine.model.model.norm.weight.dtype == torch.float32
    else:
        assert q_proj.weight.dtype == getattr(torch, dtype)
    ids = torch.tensor([engine.encode_prompt("the film was")])
    with torch.inference_mode():
        got, want = engine.model(ids).logits.float(), reference.model(ids).logits
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # close to float32, not equal
    (out,) = generate(engine, [engine.make_job(ids[0].tolist(), 8, temperature=0.0, ignore_eos=True)])
    assert out.completion_tokens == 8 and out.text.strip() and engine.dtype == dtype
