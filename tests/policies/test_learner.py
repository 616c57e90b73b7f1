"""The Learner's optimizers and gradient step: fused Adam per part, one fused finiteness check."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from cluster.config import load_config
from policies.algo import build_ppo_config

MID = "default_policy"
W = 12


@pytest.fixture(scope="module")
def learner():
    cfg = load_config("tiny", ["ppo.lr=1e-3", "ppo.vf_lr=0.5"])
    obs = gym.spaces.Dict({"input_ids": gym.spaces.Box(0, 63, (W,), np.int64), "length": gym.spaces.Discrete(W + 1)})
    spaces = {MID: (obs, gym.spaces.Discrete(cfg.model.tiny_vocab_size))}
    return build_ppo_config(cfg, 0).build_learner(spaces=spaces)


def test_policy_and_value_head_have_their_own_fused_adam(learner):
    module = learner.module[MID].unwrapped()
    policy, value = learner.get_optimizer(MID, "policy"), learner.get_optimizer(MID, "value")
    assert isinstance(policy, torch.optim.Adam) and policy.defaults["fused"]
    assert value.param_groups[0]["params"] == list(module.vf_head.parameters())
    n_lm = sum(1 for _ in module.lm.parameters())
    assert len(policy.param_groups[0]["params"]) == n_lm  # every LM weight, and not the head
    assert value.param_groups[0]["lr"] == 0.5 and policy.param_groups[0]["lr"] == 1e-3
    assert module.entropy_grad is False  # entropy_coeff is 0: the entropy is only a metric


def test_non_finite_gradients_are_zeroed_and_the_rest_still_step(learner):
    module = learner.module[MID].unwrapped()
    params = dict(learner._params)
    grads = {pid: torch.ones_like(p) for pid, p in params.items()}
    bad = next(pid for pid, p in params.items() if p is module.vf_head.weight)
    grads[bad] = torch.full_like(grads[bad], float("nan"))
    before = {pid: p.detach().clone() for pid, p in params.items()}
    learner.apply_gradients(grads)
    assert torch.equal(params[bad].grad, torch.zeros_like(params[bad]))
    assert torch.isfinite(params[bad]).all()
    moved = [pid for pid, p in params.items() if not torch.equal(p.detach(), before[pid])]
    assert len(moved) >= len(params) - 1  # every finite gradient stepped its parameter


def test_kl_is_pooled_over_learners_before_the_controller_moves():
    from policies.kl_shaping import KLStats
    from policies.learner import pooled_kl

    # This learner saw 2 responses with 6 nats in all; the other (simulated by the reduce) 6 responses, 6 nats.
    other = [6.0, 6.0]
    mine = KLStats(kl_sum=6.0, responses=2)
    assert pooled_kl(mine, lambda v: [a + b for a, b in zip(v, other)]) == pytest.approx(12 / 8)  # on every learner
    assert pooled_kl(mine, lambda v: v) == pytest.approx(3.0)  # one learner
    assert pooled_kl(KLStats(), lambda v: v) == 0.0  # nothing measured: the coefficient stays
