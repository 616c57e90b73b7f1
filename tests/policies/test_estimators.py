"""Critic-free estimators and KL estimators against hand-worked values.

Expected numbers recomputed by hand (and in float64) from the formulas of TRL 1.16
(trl/trainer/grpo_trainer.py, rloo_trainer.py), veRL (verl/trainer/ppo/core_algos.py) and OpenRLHF
(openrlhf/trainer/ppo_utils/experience_maker.py); Schulman, "Approximating KL Divergence".
"""

import numpy as np
import pytest
import torch

from cluster.config import ConfigError, load_config
from policies.estimators import grpo_advantages, returns_to_go, rloo_advantages
from policies.ppo_math import kl_k1, kl_k2, kl_k3


def test_grpo_by_hand():
    # r = [1, 2, 4]: mean 7/3, unbiased std sqrt(((4/3)^2 + (1/3)^2 + (5/3)^2) / 2) = 1.527525, + 1e-4 (TRL)
    got = grpo_advantages(np.array([1.0, 2.0, 4.0]), ["a"] * 3)
    np.testing.assert_allclose(got, [-0.872814, -0.218204, 1.091018], atol=1e-6)
    # Dr. GRPO: only the mean is subtracted
    np.testing.assert_allclose(
        grpo_advantages(np.array([1.0, 2.0, 4.0]), ["a"] * 3, scale=False), [-4 / 3, -1 / 3, 5 / 3]
    )
    # [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.577350 -> +-0.5 / 0.577450 = +-0.865875
    np.testing.assert_allclose(
        grpo_advantages(np.array([1.0, 0.0, 0.0, 1.0]), ["g"] * 4),
        [0.865875, -0.865875, -0.865875, 0.865875],
        atol=1e-6,
    )
    # a group whose rewards are all equal carries no preference: 0; groups interleaved are kept apart
    got = grpo_advantages(np.array([0.5, 3.0, 0.5, 1.0]), ["x", "y", "x", "y"])
    # y = [3, 1]: mean 2, centred +-1, unbiased std sqrt(2) -> +-1 / (1.414214 + 1e-4) = +-0.707057
    np.testing.assert_allclose(got, [0.0, 0.707057, 0.0, -0.707057], atol=1e-6)


def test_rloo_by_hand():
    # r = [1, 2, 4, 5]: baselines (12 - r) / 3 = [3.666667, 3.333333, 2.666667, 2.333333]
    np.testing.assert_allclose(
        rloo_advantages(np.array([1.0, 2.0, 4.0, 5.0]), ["p"] * 4), [-8 / 3, -4 / 3, 4 / 3, 8 / 3], atol=1e-9
    )
    np.testing.assert_allclose(rloo_advantages(np.array([2.0, 2.0]), ["p", "p"]), [0.0, 0.0])
    with pytest.raises(ValueError, match="at least two"):
        rloo_advantages(np.array([1.0]), ["p"])


def test_reinforce_pp_returns_then_batch_whitening_by_hand():
    # OpenRLHF's example: beta 0.5, kl A = [0.1, -0.05, 0.2], final reward 1 -> token rewards [-0.05, 0.025, 0.9]
    np.testing.assert_allclose(returns_to_go(np.array([-0.05, 0.025, 0.9])), [0.875, 0.925, 0.9])
    np.testing.assert_allclose(returns_to_go(np.array([-0.05, 0.025, 0.9]), gamma=0.9), [0.7015, 0.835, 0.9])
    # with B (returns [-0.15, -0.15]), C (3) and D (2) in the batch, population whitening gives OpenRLHF's values
    g = np.array([0.875, 0.925, 0.9, -0.15, -0.15, 3.0, 2.0])
    np.testing.assert_allclose(
        (g - g.mean()) / g.std(), [-0.1742, -0.1264, -0.1503, -1.1545, -1.1545, 1.8581, 0.9017], atol=1e-4
    )


def test_kl_estimators_by_hand():
    logp, ref = torch.log(torch.tensor([0.5, 0.3, 0.2])), torch.log(torch.tensor([0.4, 0.4, 0.2]))
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([0.223144, -0.287682, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(kl_k2(logp, ref), torch.tensor([0.024897, 0.041380, 0.0]), atol=1e-6, rtol=0)
    # k3 = r - 1 - log r with r = ref / pi: [0.8 - 1 + 0.223144, 4/3 - 1 - 0.287682, 0]
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([0.023144, 0.045652, 0.0]), atol=1e-6, rtol=0)
    # each is weighted by pi to get its expectation: k1 and k3 are unbiased for KL(pi || ref) = 0.023144*... exactly
    true_kl = float((torch.tensor([0.5, 0.3, 0.2]) * (logp - ref)).sum())
    for est in (kl_k1, kl_k3):
        assert float((logp.exp() * est(logp, ref)).sum()) == pytest.approx(true_kl, abs=1e-6)


def test_kl_estimators_as_loss_terms_have_the_gradients_the_docs_say():
    """Expected gradient over the sampled tokens, d/dtheta sum_x pi(x) k(log pi_theta(x)) with the samples fixed."""
    theta = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    ref = torch.log(torch.tensor([0.4, 0.4, 0.2]))

    def grad(fn):
        t = theta.clone().requires_grad_(True)
        fn(torch.log_softmax(t, -1)).backward()
        return t.grad

    weights = torch.softmax(theta, -1)  # the sampling distribution: held fixed
    reverse = grad(lambda lp: (lp.exp() * (lp - ref)).sum())  # d KL(pi || ref)
    forward = grad(lambda lp: (ref.exp() * (ref - lp)).sum())  # d KL(ref || pi)
    torch.testing.assert_close(grad(lambda lp: (weights * kl_k1(lp, ref)).sum()), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad(lambda lp: (weights * kl_k2(lp, ref)).sum()), reverse, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad(lambda lp: (weights * kl_k3(lp, ref)).sum()), forward, atol=1e-6, rtol=0)
    torch.testing.assert_close(forward, torch.tensor([0.1, -0.1, 0.0]), atol=1e-6, rtol=0)  # the notes' value


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_refuse_one_response_per_prompt(estimator):
    with pytest.raises(ConfigError, match=f"advantage_estimator={estimator} .* needs group_size >= 2"):
        load_config("tiny", [f"ppo.advantage_estimator={estimator}", "ppo.group_size=1"])
    with pytest.raises(ConfigError, match="minibatch_episodes \\(4\\) must be a multiple of group_size \\(3\\)"):
        load_config("tiny", [f"ppo.advantage_estimator={estimator}", "ppo.group_size=3", "ppo.minibatch_episodes=4"])
