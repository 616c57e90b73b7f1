"""Hand-checked values for the PPO / KL maths (every expected number is worked out in a comment)."""

import math

import numpy as np
import pytest
import torch

from policies.ppo_math import (
    KLController,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_k1,
    kl_k3,
    masked_mean,
    pg_loss,
    shape_rewards,
    value_loss,
    whiten,
)

t = torch.tensor


def test_kl_estimates():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    # k1 = logp - ref = [0.5, -1.0]
    torch.testing.assert_close(kl_k1(logp, ref), t([0.5, -1.0]))
    # k3 with r = ref - logp = [-0.5, 1.0]: e^-0.5 - 1 + 0.5 = 0.10653; e^1 - 1 - 1 = 0.71828
    torch.testing.assert_close(kl_k3(logp, ref), t([math.exp(-0.5) - 0.5, math.e - 2.0]))


def test_shape_rewards_only_on_valid_rows():
    # [0 - 0.1*0.5, 1 - 0.1*(-1), 7 (masked: untouched)] = [-0.05, 1.1, 7]
    got = shape_rewards(t([0.0, 1.0, 7.0]), t([0.5, -1.0, 3.0]), 0.1, t([True, True, False]))
    torch.testing.assert_close(got, t([-0.05, 1.1, 7.0]))


def test_gae_terminal_and_bootstrapped():
    r, v = np.array([-0.05, 1.1]), np.array([0.2, 0.4])
    # gamma 1, lambda 0.5, terminal: d1 = 1.1 + 0 - 0.4 = 0.7; d0 = -0.05 + 0.4 - 0.2 = 0.15
    # A1 = 0.7; A0 = 0.15 + 0.5 * 0.7 = 0.5; targets = A + V = [0.7, 1.1]
    adv, tgt = gae(r, v, 0.0, 1.0, 0.5)
    np.testing.assert_allclose(adv, [0.5, 0.7], atol=1e-6)
    np.testing.assert_allclose(tgt, [0.7, 1.1], atol=1e-6)
    # bootstrap V=1.0, gamma 0.9, lambda 1: d1 = 1.1 + 0.9 - 0.4 = 1.6; d0 = -0.05 + 0.36 - 0.2 = 0.11
    # A1 = 1.6; A0 = 0.11 + 0.9 * 1.6 = 1.55
    adv, _ = gae(r, v, 1.0, 0.9, 1.0)
    np.testing.assert_allclose(adv, [1.55, 1.6], atol=1e-6)


def test_masked_mean_and_whiten():
    x, m = t([1.0, 3.0, 100.0]), t([True, True, False])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    # valid rows [1, 3]: mean 2, population std 1 -> [-1, 1]
    w = whiten(x, m)
    torch.testing.assert_close(w[:2], t([-1.0, 1.0]), atol=1e-4, rtol=0)


def test_pg_loss_clips():
    # ratios e^0 = 1 and e^0.5 = 1.6487 (clipped to 1.2 for the positive advantage)
    logp, old, adv = t([0.0, 0.5]), t([0.0, 0.0]), t([1.0, 2.0])
    # row0: max(-1*1, -1*1) = -1; row1: max(-2*1.6487, -2*1.2) = -2.4 -> mean -1.7; clipped on row1 only
    loss, clipfrac = pg_loss(logp, old, adv, 0.2)
    assert loss.item() == pytest.approx(-1.7)
    assert clipfrac.item() == pytest.approx(0.5)
    # negative advantage, ratio 0.5 (below 1 - 0.2): max(0.5*1, 0.8*1) = 0.8 (pessimistic = clipped)
    loss, _ = pg_loss(t([math.log(0.5)]), t([0.0]), t([-1.0]), 0.2)
    assert loss.item() == pytest.approx(0.8)


def test_value_loss_clips_around_old_values():
    # V=2, V_old=0, R=3, clip 0.5: V_clip = 0.5; max((2-3)^2, (0.5-3)^2) = 6.25; 0.5 * 6.25 = 3.125
    assert value_loss(t([2.0]), t([0.0]), t([3.0]), 0.5).item() == pytest.approx(3.125)
    # V=1, V_old=0.9, R=1: V_clip = 1.0 -> 0
    assert value_loss(t([1.0]), t([0.9]), t([1.0]), 0.5).item() == pytest.approx(0.0)


def test_entropy_of_uniform_and_onehot():
    e = entropy_from_logits(t([[0.0, 0.0, 0.0, 0.0], [0.0, -1e9, -1e9, -1e9]]))
    torch.testing.assert_close(e, t([math.log(4.0), 0.0]))


def test_kl_controller():
    fixed = KLController(coef=0.1, target=0.0)
    assert fixed.update(100.0) == 0.1
    ctl = KLController(coef=0.1, target=4.0, horizon=10)
    # KL 6: error = clip(6/4 - 1, -0.2, 0.2) = 0.2; coef *= 1 + 0.2 / 10 = 1.02
    assert ctl.update(6.0) == pytest.approx(0.102)
    # KL 3.8: error = -0.05; coef *= 1 - 0.05 / 10 = 0.995
    assert ctl.update(3.8) == pytest.approx(0.102 * 0.995)
    assert ctl.update(float("nan")) == pytest.approx(0.102 * 0.995)


def test_kl_controller_reaches_its_target_within_a_few_horizons():
    # A synthetic policy whose KL answers the coefficient: KL = 0.3 / coef (more penalty, less drift).
    # Start at coef 0.025 (KL 12, twice the target 6): the controller must bring KL within 5% of 6.
    for horizon in (1.0, 2.0, 4.0):
        ctl, kls = KLController(coef=0.025, target=6.0, horizon=horizon), []
        for _ in range(int(6 * horizon)):
            kls.append(0.3 / ctl.coef)
            ctl.update(kls[-1])
        assert abs(0.3 / ctl.coef - 6.0) < 0.3, (horizon, kls)
        assert kls[0] == pytest.approx(12.0) and all(a >= b for a, b in zip(kls, kls[1:]))  # steers monotonically


def test_explained_variance():
    targets = t([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = torch.tensor([True, True, True, True, False])
    # values = targets: EV 1; constant values: EV 0; values off by [1, -1, 1, -1]: Var(resid) = 1, Var(targets) = 1.25
    assert explained_variance(t([1.0, 2.0, 3.0, 4.0, 0.0]), targets, mask) == pytest.approx(1.0)
    assert explained_variance(t([7.0] * 5), targets, mask) == pytest.approx(0.0)
    assert explained_variance(t([2.0, 1.0, 4.0, 3.0, 0.0]), targets, mask) == pytest.approx(1 - 1.0 / 1.25)


def test_lagrangian_reward_and_multiplier_steps_by_hand():
    from policies.ppo_math import lagrangian_reward, update_multipliers

    # objective 1.0, safety part 0.2 under threshold 0.5 with lambda 1: (1 + 1 * (0.2 - 0.5)) / (1 + 1) = 0.35
    assert lagrangian_reward(1.0, {"safety": 0.2}, {"safety": 1.0}, {"safety": 0.5}) == pytest.approx(0.35)
    assert lagrangian_reward(1.0, {"safety": 0.2}, {"safety": 0.0}, {"safety": 0.5}) == pytest.approx(1.0)  # inactive
    b = {"safety": 0.5}

    def step(integral, mean, kp):
        i, lam = update_multipliers({"safety": integral}, {"safety": mean}, b, kp=kp, ki=2.0)
        return pytest.approx((i["safety"], lam["safety"]))

    # plain update (kp 0), lambda = I: violated (mean 0.2, e = 0.3) it rises by 2 * 0.3; satisfied (0.9, e = -0.4)
    # it falls by 0.8, and never below 0
    assert step(1.0, 0.2, kp=0.0) == (1.6, 1.6)
    assert step(1.0, 0.9, kp=0.0) == (0.2, 0.2)
    assert step(0.1, 0.9, kp=0.0) == (0.0, 0.0)
    # PI, kp 3: violated, I = 1.6 and lambda = 1.6 + 3 * 0.3 = 2.5 at once; satisfied, I = 0.2 and
    # lambda = max(0, 0.2 - 3 * 0.4) = 0: the multiplier falls to zero while the integral keeps 0.2
    assert step(1.0, 0.2, kp=3.0) == (1.6, 2.5)
    assert step(1.0, 0.9, kp=3.0) == (0.2, 0.0)
    # violated then exactly met (e = 0): I = 0.6, lambda 0.6 + 0.9 = 1.5, then I stays 0.6 and lambda = 0.6
    assert step(0.0, 0.2, kp=3.0) == (0.6, 1.5)
    assert step(0.6, 0.5, kp=3.0) == (0.6, 0.6)
    # no responses (nan): the integral stays, lambda = I
    assert step(0.7, float("nan"), kp=3.0) == (0.7, 0.7)
    # constraints move independently
    i, lam = update_multipliers({"a": 1.0, "b": 0.0}, {"a": 0.2, "b": 0.9}, {"a": 0.5, "b": 0.5}, kp=3.0, ki=2.0)
    assert (i, lam) == ({"a": pytest.approx(1.6), "b": 0.0}, {"a": pytest.approx(2.5), "b": 0.0})


def test_the_window_keeps_whole_recent_iterations_until_it_is_full():
    from policies.ppo_math import recent_iterations

    history = [(3.0, 10.0), (-2.0, 4.0), (1.0, 2.0)]  # per iteration (sum, count), oldest first
    assert recent_iterations(history, 0) == [(1.0, 2.0)]  # the last iteration alone
    assert recent_iterations(history, 2) == [(1.0, 2.0)]
    assert recent_iterations(history, 3) == history[1:]  # 2 responses are not 3: one more iteration
    assert recent_iterations(history, 6) == history[1:]
    assert recent_iterations(history, 7) == history
    assert recent_iterations(history, 100) == history  # fewer responses than the window: all of them
    assert recent_iterations(history + [(0.0, 0.0)], 0) == [(1.0, 2.0), (0.0, 0.0)]  # an empty one does not count
    assert recent_iterations([], 8) == []
