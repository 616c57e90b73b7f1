"""Reward parts, their weighted composition, the no-EOS penalty and reward-model normalisation."""

import pytest

from envs.gold import gold_scores
from envs.reward_model import RewardModel, RewardModelSettings
from envs.rewards import Finished, RewardFunction, compose, eos_reward, length_reward


def batch():
    return Finished(["great fun", "awful"], ["p1", "p2"], [2, 4], [True, False], max_new_tokens=4)


def test_rule_parts():
    assert length_reward(batch()) == [0.5, 1.0]
    assert eos_reward(batch()) == [1.0, 0.0]


def test_compose_by_hand():
    parts = {"a": [1.0, 2.0], "b": [10.0, 20.0]}
    # [0.5*1 + 0.1*10, 0.5*2 + 0.1*20 - 3 (no EOS)] = [1.5, 0.0]
    assert compose(parts, {"a": 0.5, "b": 0.1}, [True, False], no_eos_penalty=-3.0) == pytest.approx([1.5, 0.0])


def test_weighted_sum_and_info_parts():
    fn = RewardFunction({"gold": 2.0, "length": 1.0, "eos": -1.0}, no_eos_penalty=-0.5)
    totals, parts = fn(batch())
    g = gold_scores(["great fun", "awful"])
    assert totals == pytest.approx([2 * g[0] + 0.5 - 1.0, 2 * g[1] + 1.0 - 0.0 - 0.5])
    assert parts[0] == pytest.approx({"gold": g[0], "length": 0.5, "eos": 1.0})


def test_reward_model_part_is_normalised_with_saved_stats():
    rm = RewardModel.untrained(RewardModelSettings(backbone="tiny"))
    raw = rm.score(["great fun", "awful"])
    rm.score_mean, rm.score_std = 0.3, 2.0
    totals, parts = RewardFunction({"reward_model": 1.0}, rm, normalize=True)(batch())
    assert totals == pytest.approx([(s - 0.3) / 2.0 for s in raw], abs=1e-5)
    assert "gold" in parts[0]  # the gold score is always reported
    totals, _ = RewardFunction({"reward_model": 1.0}, rm, normalize=False)(batch())
    assert totals == pytest.approx(raw, abs=1e-5)


def test_unknown_part_and_missing_model_fail():
    with pytest.raises(ValueError, match="unknown reward part"):
        RewardFunction({"nope": 1.0})
    with pytest.raises(ValueError, match="no reward model"):
        RewardFunction({"reward_model": 1.0})
