"""KL-to-reference shaping and GAE on hand-made episodes, through the learner connector pieces."""

import math

import numpy as np
import pytest
import torch
from ray.rllib.connectors.learner import AddOneTsToEpisodesAndTruncate
from ray.rllib.core.columns import Columns
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.evaluation.postprocessing import Postprocessing

from policies.advantages import TokenGAE, episode_gae
from policies.kl_shaping import KLToReference
from policies.ppo_math import KLController

MID = "default_policy"


class FakeModule:
    """Stands in for LMModule: fixed reference log-probs and values per row."""

    def __init__(self, ref_logp, values):
        self._ref, self._values = torch.tensor(ref_logp), torch.tensor(values)

    def unwrapped(self):
        return self

    def reference_pass(self, batch):
        return self._ref, torch.zeros(len(self._ref), 4)

    def compute_values(self, batch, embeddings=None):
        return self._values


def episode(n_steps, rewards, logp, done):
    """A response of n_steps tokens; the last info marks whether the response ended."""
    infos = [{}] * n_steps + [{"response_done": True, "response_tokens": n_steps} if done else {}]
    return SingleAgentEpisode(
        observations=list(range(n_steps + 1)),
        actions=[5] * n_steps,
        rewards=rewards,
        infos=infos,
        terminated=done,
        extra_model_outputs={Columns.ACTION_LOGP: logp},
        len_lookback_buffer=0,
    )


def test_kl_shaping_then_gae_by_hand():
    # Episode A: 2 tokens, ended (EOS). Episode B: 1 token, not ended (bootstraps; whole-response iterations never
    # produce one, but GAE keeps the general rule).
    eps = [episode(2, [0.0, 1.0], [-1.0, -2.0], True), episode(1, [0.0], [-0.5], False)]
    batch = {}
    AddOneTsToEpisodesAndTruncate()(rl_module=None, batch=batch, episodes=eps, shared_data={})
    # rows: A0 A1 A-boot B0 B-boot
    mb = {
        Columns.LOSS_MASK: torch.tensor([True, True, False, True, False]),
        Columns.ACTION_LOGP: torch.tensor([-1.0, -2.0, -2.0, -0.5, -0.5]),
        Columns.REWARDS: torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]),
        Columns.OBS: None,
    }
    module = {MID: FakeModule([-1.5, -1.0, 9.0, -0.5, 9.0], [0.2, 0.4, 0.9, 0.3, 0.6])}
    ctl = KLController(coef=0.1)
    kl = KLToReference(controller=ctl)
    kl(rl_module=module, batch={MID: mb}, episodes=eps)
    # kl = [0.5, -1.0, 0 (boot), 0.0, 0 (boot)]; shaped = [-0.05, 1.1, 0, 0, 0]
    torch.testing.assert_close(mb[Columns.REWARDS], torch.tensor([-0.05, 1.1, 0.0, 0.0, 0.0]))
    # per-response KL: k1 total 0.5 - 1.0 + 0.0 = -0.5 over the batch's 2 responses
    assert (kl.last.kl_sum, kl.last.responses, kl.last.coef_used) == (pytest.approx(-0.5), 2, 0.1)
    # k3 = e^r - 1 - r with r = ref - old: A0 r=-0.5 -> 0.106531, A1 r=1.0 -> 0.718282, B0 r=0 -> 0
    assert kl.last.kl_k3_sum == pytest.approx(0.106531 + 0.718282, abs=1e-5)
    TokenGAE(gamma=1.0, lambda_=0.5)(rl_module=module, batch={MID: mb}, episodes=eps)
    # A (terminal): d1 = 1.1 - 0.4 = 0.7, d0 = -0.05 + 0.4 - 0.2 = 0.15 -> A = [0.5, 0.7], targets [0.7, 1.1]
    # B (cut, bootstrap V=0.6): d0 = 0 + 0.6 - 0.3 = 0.3 -> A = 0.3, target 0.6; bootstrap rows: A 0, target V
    np.testing.assert_allclose(mb[Postprocessing.ADVANTAGES].numpy(), [0.5, 0.7, 0.0, 0.3, 0.0], atol=1e-6)
    np.testing.assert_allclose(mb[Postprocessing.VALUE_TARGETS].numpy(), [0.7, 1.1, 0.9, 0.6, 0.6], atol=1e-6)
    np.testing.assert_allclose(mb[Columns.VF_PREDS].numpy(), [0.2, 0.4, 0.9, 0.3, 0.6], atol=1e-6)


def test_episode_gae_rejects_mismatched_lengths():
    with pytest.raises(AssertionError):
        episode_gae(np.zeros(4), np.zeros(4), [2, 3], [True, True], 1.0, 1.0)


def test_advantages_are_whitened_over_the_whole_iteration_pooled_across_learners():
    from policies.advantages import WhitenAdvantages

    # Two learners' shards; valid rows 1, 2, 3 | 5 (bootstrap rows masked). Pooled: mean 2.75, population std 1.479020.
    shards = [
        (torch.tensor([1.0, 2.0, 9.0, 3.0]), torch.tensor([True, True, False, True])),
        (torch.tensor([5.0, -7.0]), torch.tensor([True, False])),
    ]
    stats = [[float(a[m].sum()), float((a[m] ** 2).sum()), float(m.sum())] for a, m in shards]
    pooled = [sum(col) for col in zip(*stats)]  # what the all-reduce gives every learner
    out = []
    for adv, mask in shards:
        mb = {Postprocessing.ADVANTAGES: adv.clone(), Columns.LOSS_MASK: mask}
        WhitenAdvantages(all_reduce_sum=lambda values: pooled)(rl_module=None, batch={MID: mb}, episodes=[])
        out.append(mb[Postprocessing.ADVANTAGES])
    std = math.sqrt(((1 - 2.75) ** 2 + (2 - 2.75) ** 2 + (3 - 2.75) ** 2 + (5 - 2.75) ** 2) / 4)
    torch.testing.assert_close(out[0], torch.tensor([(1 - 2.75) / std, (2 - 2.75) / std, 0.0, (3 - 2.75) / std]))
    torch.testing.assert_close(out[1], torch.tensor([(5 - 2.75) / std, 0.0]))
    assert std == pytest.approx(1.479020, abs=1e-6)
