"""Learner connector: the per-token KL-to-reference penalty, added to the rewards before the advantages.

For every generated token ``kl_t = log pi_old(a_t) - log pi_ref(a_t)`` (the k1 estimate; the
sampling log-prob comes from the EnvRunner, the reference log-prob from one packed forward of
the frozen reference model). With ``ppo.kl_in='reward'``, ``r_t <- r_t - beta * kl_t`` (with the
chosen estimator); with ``'loss'`` the rewards stay as they are and the reference log-probs are
left in the batch (``ref_logp``) for the loss's KL term. The same pass leaves the
reference hidden states in the batch (``ref_hidden``) when the value head reads them. ``beta``
comes from the learner's :class:`~policies.ppo_math.KLController`; the connector records the
batch's per-response KL (a :class:`KLStats`) so the learner can adapt ``beta`` after the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.utils.annotations import override

from policies.lm_module import REF_HIDDEN
from policies.ppo_math import KLController, kl_k1, kl_k3, shape_rewards

REF_LOGP = "ref_logp"  # (N,) the reference model's log-prob of each row's token


@dataclass
class KLStats:
    """KL to the reference over this Learner's share of an iteration (sums, so Learners can pool them)."""

    kl_sum: float = 0.0
    """Sum over responses of the k1 KL (nats), the quantity the controller steers."""
    kl_k3_sum: float = 0.0
    """The same with the k3 estimator (non-negative, lower variance), for the logs."""
    responses: int = 0
    coef_used: float = 0.0
    """The coefficient that shaped these rewards."""


class KLToReference(ConnectorV2):
    """Run the reference pass; shape ``REWARDS`` with the KL penalty (kl_in=reward); keep ``ref_logp`` and the KL statistics."""

    def __init__(
        self,
        input_observation_space=None,
        input_action_space=None,
        *,
        controller: KLController,
        shaping=kl_k1,
        **kwargs,
    ):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.controller, self.shaping = controller, shaping
        self.last = KLStats()

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        responses = len(list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False)))
        for mid, mbatch in batch.items():
            mask = mbatch[Columns.LOSS_MASK].bool()  # (N,) False on the bootstrap row
            old_logp = mbatch[Columns.ACTION_LOGP].float()  # (N,)
            ref_logp, ref_hidden = rl_module[mid].unwrapped().reference_pass(mbatch)  # (N,), (N, H) or None
            if ref_hidden is not None:
                mbatch[REF_HIDDEN] = ref_hidden
            mbatch[REF_LOGP] = ref_logp
            kl = torch.where(mask, kl_k1(old_logp, ref_logp), 0.0)  # (N,) what the controller steers
            if self.shaping is not None:
                penalty = torch.where(mask, self.shaping(old_logp, ref_logp), 0.0)
                mbatch[Columns.REWARDS] = shape_rewards(
                    mbatch[Columns.REWARDS].float(), penalty, self.controller.coef, mask
                )
            k3 = torch.where(mask, kl_k3(old_logp, ref_logp), 0.0)
            self.last = KLStats(float(kl.sum()), float(k3.sum()), responses, self.controller.coef)
        return batch
