"""Learner connectors: the advantages of every token (GAE, GRPO/RLOO, REINFORCE++), and whitening over the iteration.

Which ones run is ``ppo.advantage_estimator`` (:class:`~policies.learner.LMPPOLearner` builds the
pipeline): ``gae`` = :class:`TokenGAE` then :class:`WhitenAdvantages`; ``grpo``/``rloo`` =
:class:`OutcomeAdvantages` (group-relative, no critic); ``reinforce_pp`` = :class:`ReinforceReturns`
then :class:`WhitenAdvantages` (batch-normalised returns, no critic).

:class:`TokenGAE` replaces RLlib's ``GeneralAdvantageEstimation``: a response that ended (EOS or
the token budget) is terminal in RLHF, so its bootstrap value is 0 even when Gymnasium calls it
"truncated" (iterations hold whole responses, so nothing is ever cut mid-response); and PPO's
clipped value loss needs the old values, which RLlib's piece drops.

:class:`WhitenAdvantages` standardises the advantages over every token of the iteration, pooled
across Learners (as TRL and OpenRLHF do), not per minibatch: a minibatch of a few responses is too
small a sample for its own mean and std.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.annotations import override

from envs.text_env import ResponseInfo
from policies.env_runner import GROUP
from policies.estimators import grpo_advantages, returns_to_go, rloo_advantages
from policies.ppo_math import explained_variance, gae


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


def response_ended(episode) -> bool:
    """Whether an episode's response is finished (EOS or the token budget): then it bootstraps from 0."""
    info: ResponseInfo = episode.get_infos(-1)
    return bool(info.get("response_done", False))


class TokenGAE(ConnectorV2):
    """Adds ``vf_preds``, ``advantages`` and ``value_targets`` to the batch; records the critic's explained variance."""

    def __init__(
        self, input_observation_space=None, input_action_space=None, *, gamma: float, lambda_: float, **kwargs
    ):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.gamma, self.lambda_ = gamma, lambda_
        self.explained_variance = float("nan")

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        sa_episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        lens = [len(e) for e in sa_episodes]
        ended = [response_ended(e) for e in sa_episodes]
        for mid, mbatch in batch.items():
            with torch.no_grad():
                values = rl_module[mid].unwrapped().compute_values(mbatch).float()  # (N,)
            r = mbatch[Columns.REWARDS].float().cpu().numpy()
            adv, targets = episode_gae(r, values.cpu().numpy(), lens, ended, self.gamma, self.lambda_)
            mbatch[Columns.VF_PREDS] = values
            mbatch[Postprocessing.ADVANTAGES] = torch.from_numpy(adv).to(values.device)
            mbatch[Postprocessing.VALUE_TARGETS] = torch.from_numpy(targets).to(values.device)
            self.explained_variance = explained_variance(
                values, mbatch[Postprocessing.VALUE_TARGETS], mbatch[Columns.LOSS_MASK].bool()
            )
        return batch


class WhitenAdvantages(ConnectorV2):
    """Standardise ``advantages`` over the valid rows of the whole iteration, mean and std pooled across Learners."""

    def __init__(
        self,
        input_observation_space=None,
        input_action_space=None,
        *,
        all_reduce_sum: Callable[[list[float]], list[float]],
        **kwargs,
    ):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.all_reduce_sum = all_reduce_sum

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        for mbatch in batch.values():
            adv, mask = mbatch[Postprocessing.ADVANTAGES], mbatch[Columns.LOSS_MASK].bool()
            valid = adv[mask].double()
            total, squares, n = self.all_reduce_sum([float(valid.sum()), float((valid**2).sum()), float(mask.sum())])
            mean = total / max(n, 1.0)
            std = max(squares / max(n, 1.0) - mean**2, 0.0) ** 0.5
            mbatch[Postprocessing.ADVANTAGES] = torch.where(mask, (adv - mean) / (std + 1e-8), 0.0).float()
        return batch


def _episode_spans(episodes: list) -> list[tuple[int, int]]:
    """(first row, tokens) of each episode in the batch (each episode is its tokens plus one bootstrap row)."""
    spans, start = [], 0
    for e in episodes:
        spans.append((start, len(e) - 1))
        start += len(e)
    return spans


class OutcomeAdvantages(ConnectorV2):
    """GRPO or RLOO: one advantage per response from its score and its group's, on every one of its tokens."""

    def __init__(
        self, input_observation_space=None, input_action_space=None, *, estimator: str, scale: bool = True, **kwargs
    ):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.estimator, self.scale = estimator, scale

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        sa_episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        spans = _episode_spans(sa_episodes)
        groups = [str(e.custom_data.get(GROUP, e.id_)) for e in sa_episodes]
        for mbatch in batch.values():
            rewards = mbatch[Columns.REWARDS].float().cpu().numpy()
            scores = np.array([rewards[s : s + n].sum() for s, n in spans])  # (E,)
            if self.estimator == "grpo":
                per_response = grpo_advantages(scores, groups, self.scale)
            else:
                per_response = rloo_advantages(scores, groups)
            adv = np.zeros(len(rewards), dtype=np.float32)
            for (s, n), a in zip(spans, per_response):
                adv[s : s + n] = a
            mbatch[Postprocessing.ADVANTAGES] = torch.from_numpy(adv).to(mbatch[Columns.REWARDS].device)
        return batch


class ReinforceReturns(ConnectorV2):
    """REINFORCE++: each token's advantage is its (KL-shaped) return to the end of the response; whitened after."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, gamma: float, **kwargs):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.gamma = gamma

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        spans = _episode_spans(list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False)))
        for mbatch in batch.values():
            rewards = mbatch[Columns.REWARDS].float().cpu().numpy()
            adv = np.zeros(len(rewards), dtype=np.float32)
            for s, n in spans:
                adv[s : s + n] = returns_to_go(rewards[s : s + n], self.gamma)
            mbatch[Postprocessing.ADVANTAGES] = torch.from_numpy(adv).to(mbatch[Columns.REWARDS].device)
        return batch
