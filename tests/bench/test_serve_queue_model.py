"""bench/serve_queue_model.py: the serving scheduler on a virtual clock, against timelines worked out by hand."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import serve_queue_model as qm  # noqa: E402

from envs import tiny  # noqa: E402
from serve.engine import GenerationEngine  # noqa: E402

# a step 10 ms + 1 ms per row, a joining prompt 2 ms per token, a prefill 20 ms + 1 ms per token
COSTS = qm.Costs(step_ms=10, row_ms=1, join_token_ms=2, prefill_ms=20, prefill_token_ms=1)


@pytest.fixture(scope="module")
def engine() -> GenerationEngine:
    model, tok = tiny.causal_lm(vocab_size=len(tiny.tokenizer()))
    return GenerationEngine(model, tok, max_tokens_limit=8)


def args(**kw) -> argparse.Namespace:
    base = dict(
        max_batch=4,
        batch_wait=0.0,
        tokens=4,
        tokens_spread=0,
        length_seed=0,
        prompt_tokens=3,
        clients=1,
        rtt_ms=0.0,
        duration=1.0,
        warmup=0.0,
    )
    return argparse.Namespace(**{**base, **kw})


def two_requests(engine, mode: str) -> qm.Served:
    """A arrives at 0, B at 15 ms (while A decodes); their latencies in order of completion."""
    return qm.Replica(engine, COSTS, mode, args()).run([0.0, 0.015])


def test_continuous_b_joins_a_running_step_and_both_timelines_are_the_hand_worked_ones(engine):
    # A: prefill 20 + 3 = 23 ms (token 1); B joins the next step: 10 + 2 rows + 2 * 3 = 18 -> 41 ms (A 2, B 1);
    # steps of 2 rows, 12 ms: 53 (A 3, B 2), 65 (A 4: done, 65 ms); B alone, 11 ms: 76 (B 4: done, 76 - 15 = 61 ms)
    served = two_requests(engine, "continuous")
    assert served.latency == pytest.approx([0.065, 0.061])
    assert served.ttft == pytest.approx([0.023, 0.026])
    assert (served.steps, served.row_steps) == (5, 8)  # 1 + 2 + 2 + 2 + 1 rows


def test_static_b_waits_for_a_whole_batch(engine):
    # A: prefill 23 ms, then 3 steps of 11 ms -> 56 ms; B is admitted after: prefill 23 -> 79 (TTFT 64 ms), 3 x 11 -> 112
    served = two_requests(engine, "static")
    assert served.latency == pytest.approx([0.056, 0.097])
    assert served.ttft == pytest.approx([0.023, 0.064])


def test_closed_loop_one_client_is_one_request_per_prefill_and_three_steps(engine):
    # each request: prefill 23 ms + 3 steps of 11 ms = 56 ms, the next sent at once
    for mode in qm.MODES:
        assert qm.closed_loop(engine, COSTS, mode, args(duration=0.55)) == pytest.approx(9 / 0.55)  # ends at 56k ms


def test_a_static_replica_idles_until_its_batch_wait_ends(engine):
    replica = qm.Replica(engine, COSTS, "static", args(batch_wait=0.1))
    replica.submit(0.0)
    assert not replica.scheduler.run_once()  # the batch may still fill
    replica.idle_until(5.0)
    assert replica.clock.t == pytest.approx(0.1) and replica.scheduler.run_once()


def test_poisson_runs_every_request_and_continuous_answers_first_sooner(engine):
    a = args(duration=3.0, max_batch=8, batch_wait=0.05)
    results = {mode: qm.poisson(engine, COSTS, mode, 40.0, 0, a).summary() for mode in qm.MODES}
    assert results["continuous"]["requests"] == results["static"]["requests"] > 60
    assert results["continuous"]["mean_ttft_s"] < results["static"]["mean_ttft_s"]
    assert results["continuous"]["p50_s"] < results["static"]["p50_s"]
