"""Learner connector: values, GAE advantages and value targets for every token row.

Replaces RLlib's ``GeneralAdvantageEstimation`` for two reasons: a response that ended (EOS
or the token budget) is terminal in RLHF, so its bootstrap value is 0 even when Gymnasium
calls it "truncated" (only a chunk cut by the sampler bootstraps from V); and PPO's clipped
value loss needs the old values, which RLlib's piece drops. Advantages are *not* whitened here
(the loss whitens per minibatch when ``whiten_advantages``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.annotations import override

from policies.ppo_math import gae


def episode_gae(
    rewards: np.ndarray, values: np.ndarray, lens: list[int], ended: list[bool], gamma: float, lambda_: float
) -> tuple[np.ndarray, np.ndarray]:
    """GAE over concatenated episode chunks, each ``len`` rows = its steps + one bootstrap row.

    rewards, values: (N,) with N = sum(lens). Bootstrap rows get advantage 0 and target V.
    Returns (advantages (N,), value targets (N,)).
    """
    adv = np.zeros_like(values, dtype=np.float32)
    targets = values.astype(np.float32).copy()
    start = 0
    for n, done in zip(lens, ended):
        T = n - 1
        boot = 0.0 if done else float(values[start + T])
        a, t = gae(rewards[start : start + T], values[start : start + T], boot, gamma, lambda_)
        adv[start : start + T], targets[start : start + T] = a, t
        start += n
    assert start == len(values), (start, len(values))
    return adv, targets


class TokenGAE(ConnectorV2):
    """Adds ``vf_preds``, ``advantages`` and ``value_targets`` to the batch (values from the reference features already there)."""

    def __init__(
        self, input_observation_space=None, input_action_space=None, *, gamma: float, lambda_: float, **kwargs
    ):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.gamma, self.lambda_ = gamma, lambda_

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        sa_episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        lens = [len(e) for e in sa_episodes]
        ended = [bool(e.get_infos(-1).get("response_done", False)) for e in sa_episodes]
        for mid, mbatch in batch.items():
            module = rl_module[mid].unwrapped()
            with torch.no_grad():
                values = module.compute_values(mbatch)  # (N,)
            device = values.device
            v = values.float().cpu().numpy()
            r = mbatch[Columns.REWARDS].float().cpu().numpy()
            adv, targets = episode_gae(r, v, lens, ended, self.gamma, self.lambda_)
            mbatch[Columns.VF_PREDS] = values.float()
            mbatch[Postprocessing.ADVANTAGES] = torch.from_numpy(adv).to(device)
            mbatch[Postprocessing.VALUE_TARGETS] = torch.from_numpy(targets).to(device)
        return batch
