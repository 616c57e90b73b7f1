"""Learner connector: the per-token KL-to-reference penalty, added to the rewards before GAE.

For every generated token ``kl_t = log pi_old(a_t) - log pi_ref(a_t)`` (the k1 estimate; the
sampling log-prob comes from the EnvRunner, the reference log-prob from one packed forward of
the frozen reference model), and ``r_t <- r_t - beta * kl_t``. The same pass leaves the
reference hidden states in the batch (``ref_hidden``), where the value head reads them. ``beta`` comes from the
learner's :class:`~policies.ppo_math.KLController`; the connector records the batch's mean
per-response KL there so the learner can adapt ``beta`` after the update.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.utils.annotations import override

from policies.lm_module import REF_HIDDEN
from policies.ppo_math import KLController, kl_k1, kl_k3, shape_rewards


def responses_in(episodes: list, tokens: float) -> float:
    """How many whole responses `tokens` tokens are, using the mean length of responses that ended here."""
    ended = [e.get_infos(-1).get("response_tokens") for e in episodes if e.get_infos(-1).get("response_done")]
    mean_len = sum(ended) / len(ended) if ended else max(tokens / max(len(episodes), 1), 1.0)
    return max(tokens / max(mean_len, 1.0), 1e-6)


class KLToReference(ConnectorV2):
    """Shape ``REWARDS`` with the KL penalty; store the per-token KL as ``kl_ref`` in the batch."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, controller: KLController, **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.controller = controller
        self.last: dict[str, float] = {}

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        sa_episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        for mid, mbatch in batch.items():
            module = rl_module[mid].unwrapped()
            mask = mbatch[Columns.LOSS_MASK].bool()  # (N,) False on the bootstrap row
            old_logp = mbatch[Columns.ACTION_LOGP].float()  # (N,)
            ref_logp, mbatch[REF_HIDDEN] = module.reference_pass(mbatch)  # (N,), (N, H)
            kl = torch.where(mask, kl_k1(old_logp, ref_logp), 0.0)  # (N,)
            mbatch[Columns.REWARDS] = shape_rewards(mbatch[Columns.REWARDS].float(), kl, self.controller.coef, mask)
            mbatch["kl_ref"] = kl
            n = responses_in(sa_episodes, float(mask.sum()))
            self.last = {
                "kl_ref": float(kl.sum()) / n,  # nats per response
                "kl_ref_k3": float(torch.where(mask, kl_k3(old_logp, ref_logp), 0.0).sum()) / n,
                "responses": n,
                "kl_coef_used": self.controller.coef,
            }
        return batch
