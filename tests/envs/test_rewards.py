"""Reward parts, their weighted composition, the no-EOS penalty, reward-model normalisation, per-criterion parts."""

import pytest

from envs.gold import gold_scores
from envs.reward_model import RewardModel, RewardModelSettings
from envs.rewards import (
    Finished,
    RewardFunction,
    check_part_names,
    compose,
    eos_reward,
    length_reward,
    uses_reward_model,
)


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
    assert {k: parts[0][k] for k in ("gold", "length", "eos")} == pytest.approx(
        {"gold": g[0], "length": 0.5, "eos": 1.0}
    )


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


TWO = RewardModelSettings(backbone="tiny", criteria=["positivity", "consistency"])


def test_every_head_and_gold_criterion_is_reported_and_weighted_ones_enter_the_total():
    import torch

    torch.manual_seed(0)
    rm = RewardModel.untrained(TWO)
    calls = []
    orig = rm.score_all
    rm.score_all = lambda *a, **k: calls.append(a) or orig(*a, **k)
    b = Finished(["great", "awful", " "], ["I hated this movie"] * 3, [1, 1, 1], [True, True, True], max_new_tokens=4)
    fn = RewardFunction(
        {"reward_model.consistency": 2.0, "gold.consistency": 1.0}, rm, normalize=False, empty_score=-5.0
    )
    totals, parts = fn(b)
    assert len(calls) == 1  # every head from one batched call
    assert set(parts[0]) == {
        "reward_model",
        "reward_model.positivity",
        "reward_model.consistency",
        "gold",
        "gold.positivity",
        "gold.consistency",
    }
    con = orig(["great", "awful"], ["I hated this movie"] * 2, criteria=["consistency"])["consistency"]
    assert [p["reward_model.consistency"] for p in parts[:2]] == pytest.approx(con, abs=1e-5)
    assert all(p["reward_model"] == p["reward_model.positivity"] for p in parts)
    assert all(p["gold"] == p["gold.positivity"] for p in parts)
    # gold.consistency after "I hated this movie" (VADER -0.6369): great 0.3691, awful 0.91095 (see test_gold)
    assert [p["gold.consistency"] for p in parts[:2]] == pytest.approx([0.3691, 0.91095])
    assert parts[2]["reward_model.positivity"] == parts[2]["reward_model.consistency"] == -5.0  # empty response
    assert totals[:2] == pytest.approx([2 * con[0] + 0.3691, 2 * con[1] + 0.91095], abs=1e-5)


def test_part_names_validate_against_heads_and_gold_criteria():
    rm = RewardModel.untrained(TWO)
    with pytest.raises(ValueError, match=r"unknown reward part 'reward_model.safety'.*heads: \['positivity'"):
        RewardFunction({"reward_model.safety": 1.0}, rm)
    with pytest.raises(ValueError, match="unknown reward part 'gold.safety'"):
        RewardFunction({"gold.safety": 1.0})
    with pytest.raises(ValueError, match="no reward model"):
        RewardFunction({"reward_model.consistency": 1.0})
    check_part_names(["reward_model.anything", "gold.consistency", "length"])  # heads unknown yet: shape only
    assert uses_reward_model({"reward_model.consistency": 1.0}) and not uses_reward_model({"gold": 1.0})
    totals, parts = RewardFunction({"gold.consistency": 1.0})(batch())
    assert "reward_model" not in parts[0] and totals == [p["gold.consistency"] for p in parts]
