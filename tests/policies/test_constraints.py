"""The Lagrangian-reward connector: it measures the batch, steps the multipliers, then writes the rewards."""

import pytest
import torch
from ray.rllib.connectors.learner import AddOneTsToEpisodesAndTruncate
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode

from policies.constraints import LagrangianReward

MID = "default_policy"


def response(n_steps, reward, part):
    """A finished response of n_steps tokens whose last info carries its reward and its part 'c'."""
    last = {"response_done": True, "reward": reward, "reward_parts": {"c": part, "other": 9.0}}
    return SingleAgentEpisode(
        observations=list(range(n_steps + 1)),
        actions=[5] * n_steps,
        rewards=[0.0] * (n_steps - 1) + [reward],
        infos=[{}] * n_steps + [last],
        terminated=True,
        len_lookback_buffer=0,
    )


def run(all_reduce_sum):
    # rows: A0 A1 A-boot B0 B-boot; A (2 tokens) has reward 1 and c = 0.2, B (1 token) reward 0 and c = 0.4
    eps = [response(2, 1.0, 0.2), response(1, 0.0, 0.4)]
    AddOneTsToEpisodesAndTruncate()(rl_module=None, batch={}, episodes=eps, shared_data={})
    mb = {Columns.REWARDS: torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])}
    c = LagrangianReward(thresholds={"c": 0.5}, init=1.0, kp=3.0, ki=2.0, all_reduce_sum=all_reduce_sum)
    c(rl_module=None, batch={MID: mb}, episodes=eps)
    return c, mb[Columns.REWARDS]


def test_the_batch_that_measured_a_violation_is_trained_against_it():
    # mean c = 0.3 < 0.5, e = 0.2: I = 1 + 2 * 0.2 = 1.4, lambda = 1.4 + 3 * 0.2 = 2.0, used for this very batch:
    # A: (1 + 2 (0.2 - 0.5)) / 3 = 0.4 / 3; B: (0 + 2 (0.4 - 0.5)) / 3 = -0.2 / 3; other rows untouched
    c, rewards = run(lambda values: values)
    assert c.means == {"c": pytest.approx(0.3)}
    assert (c.integrals, c.multipliers) == ({"c": pytest.approx(1.4)}, {"c": pytest.approx(2.0)})
    torch.testing.assert_close(rewards, torch.tensor([0.0, 0.4 / 3, 0.0, -0.2 / 3, 0.0]))


def test_the_mean_is_pooled_across_learners():
    # another Learner holds two responses with c summing to 1.9: mean (0.6 + 1.9) / 4 = 0.625, e = -0.125:
    # I = 1 - 0.25 = 0.75, lambda = 0.75 - 0.375 = 0.375; A: (1 - 0.375 * 0.3) / 1.375, B: -0.375 * 0.1 / 1.375
    c, rewards = run(lambda values: [values[0] + 1.9, values[1] + 2.0])
    assert c.means == {"c": pytest.approx(0.625)}
    assert (c.integrals, c.multipliers) == ({"c": pytest.approx(0.75)}, {"c": pytest.approx(0.375)})
    torch.testing.assert_close(rewards, torch.tensor([0.0, 0.8875 / 1.375, 0.0, -0.0375 / 1.375, 0.0]))


def test_a_constraint_on_a_part_the_env_does_not_report_fails_with_its_name():
    eps = [response(1, 1.0, 0.2)]
    c = LagrangianReward(thresholds={"missing": 0.0}, init=1.0, kp=0.0, ki=1.0, all_reduce_sum=lambda v: v)
    with pytest.raises(ValueError, match="missing"):
        c(rl_module=None, batch={MID: {Columns.REWARDS: torch.zeros(2)}}, episodes=eps)


def test_the_multipliers_step_from_the_mean_over_the_window():
    # window 3 responses, 2 per iteration: iteration 1 sees its own mean 0.3; iteration 2 (parts 0.8 and 1.0)
    # pools both iterations, (0.6 + 1.8) / 4 = 0.6 (its own mean is 0.9), e = 0.5 - 0.6 = -0.1:
    # I = 1.4 - 0.2 = 1.2, lambda = 1.2 - 0.3 = 0.9
    c = LagrangianReward(thresholds={"c": 0.5}, init=1.0, kp=3.0, ki=2.0, window=3, all_reduce_sum=lambda v: v)

    def iteration(parts):
        eps = [response(1, 0.0, part) for part in parts]
        AddOneTsToEpisodesAndTruncate()(rl_module=None, batch={}, episodes=eps, shared_data={})
        c(rl_module=None, batch={MID: {Columns.REWARDS: torch.zeros(4)}}, episodes=eps)

    iteration([0.2, 0.4])
    assert c.means == {"c": pytest.approx(0.3)}
    iteration([0.8, 1.0])
    assert c.batch_means == {"c": pytest.approx(0.9)} and c.means == {"c": pytest.approx(0.6)}
    assert (c.integrals, c.multipliers) == ({"c": pytest.approx(1.2)}, {"c": pytest.approx(0.9)})
    # a third iteration pools with the second only, (1.8 + 0.0) / 4; the first leaves the history
    iteration([0.0, 0.0])
    assert c.means == {"c": pytest.approx(0.45)}
    assert [n for _, n in c.history["c"]] == [2.0, 2.0]
