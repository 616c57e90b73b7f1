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
