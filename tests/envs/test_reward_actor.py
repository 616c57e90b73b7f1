"""The shared reward-model actor's batching (as a plain object, no Ray) and its missing-actor error."""

import asyncio

import pytest

from envs.models import ModelSettings
from envs.reward_actor import RemoteRewardModel, RewardModelServer
from envs.reward_model import RewardModelSettings
from envs.text_env import build_resources

TINY = RewardModelSettings(backbone="tiny", path="no/such/dir")  # no trained model there: an untrained tiny RM


def test_concurrent_calls_are_scored_in_one_batch():
    server = RewardModelServer(TINY, wait_s=0.01)
    a, b = ["great fun", "awful"], ["a wonderful story"]

    async def two_runners():
        return await asyncio.gather(server.score(a, normalize=True), server.score(b, normalize=True))

    got_a, got_b = asyncio.run(two_runners())
    assert got_a + got_b == pytest.approx(server.rm.score(a + b, normalize=True), abs=1e-5)
    assert asyncio.run(server.stats()) == {"texts": 3, "calls": 2, "batches": 1}


def test_requests_with_different_options_are_not_mixed():
    server = RewardModelServer(TINY, wait_s=0.01)

    async def two_kinds():
        return await asyncio.gather(
            server.score(["great"], normalize=False), server.score(["bad"], prompts=["p"], normalize=False)
        )

    raw, with_prompt = asyncio.run(two_kinds())
    assert raw == pytest.approx(server.rm.score(["great"]), abs=1e-5)
    assert with_prompt == pytest.approx(server.rm.score(["bad"], ["p"]), abs=1e-5)
    assert asyncio.run(server.stats())["batches"] == 2


def test_env_without_the_actor_fails_clearly():
    with pytest.raises(RuntimeError, match="no reward-model actor 'alignray-reward-model' is running"):
        RemoteRewardModel()
    with pytest.raises(RuntimeError, match="reward_model_placement='actor'"):
        build_resources(
            {"reward": {"reward_model": 1.0}},
            model=ModelSettings(policy="tiny"),
            prompts=["a prompt"],
            shared_reward_actor=True,
        )


TWO = TINY.model_copy(update={"criteria": ["positivity", "consistency"]})


def test_criteria_are_batched_by_head_and_score_all_in_one_pass():
    server = RewardModelServer(TWO, wait_s=0.01)
    rm, prompts = server.rm, ["I hated this movie", "the film"]

    async def mixed():
        return await asyncio.gather(
            server.score(["great"], prompts[:1], criterion="consistency"),
            server.score(["awful"], prompts[1:], criterion="consistency"),
            server.score(["great"], prompts[:1]),  # None: the first head
            server.score(["fine"], prompts[1:], criterion="positivity"),  # the same head named: same batch
            server.score_all(["great", "awful"], prompts),
        )

    con_a, con_b, pos_a, pos_b, every = asyncio.run(mixed())
    assert con_a + con_b == pytest.approx(rm.score(["great", "awful"], prompts, criterion="consistency"), abs=1e-5)
    assert pos_a + pos_b == pytest.approx(rm.score(["great", "fine"]), abs=1e-5)
    want = rm.score_all(["great", "awful"], prompts)
    assert set(every) == {"positivity", "consistency"}
    for c in every:
        assert every[c] == pytest.approx(want[c], abs=1e-5)
    assert asyncio.run(server.stats())["batches"] == 3  # consistency, positivity, every head
    assert asyncio.run(server.criteria()) == ["positivity", "consistency"]


def test_unknown_criterion_fails_only_its_caller():
    server = RewardModelServer(TWO, wait_s=0.01)
    with pytest.raises(ValueError, match="no head 'safety'"):
        asyncio.run(server.score(["great"], criterion="safety"))
    asyncio.run(server.check_health())  # every head is finite
