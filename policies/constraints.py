"""Learner connector: constrained rewards (PPO-Lagrangian), one Lagrange multiplier per constraint.

``ppo.constraints`` maps reward parts to thresholds, ``E[part] >= threshold`` (for example
``{reward_model.consistency: 0.0}``); the objective is the env's weighted reward. Each response's
final reward becomes :func:`~policies.ppo_math.lagrangian_reward` of its objective and its
constrained parts (read from the episode's :class:`~envs.text_env.ResponseInfo`) under the current
multipliers. The connector records each constrained part's sum over the batch; after the update
the Learner pools those across Learners and moves every multiplier one projected step
(:func:`~policies.ppo_math.update_multipliers`), so all Learners keep the same multipliers, which
are saved with the Learner's state like the KL coefficient.
"""

from __future__ import annotations

from typing import Any

from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.utils.annotations import override

from policies.ppo_math import lagrangian_reward


class LagrangianReward(ConnectorV2):
    """Replace each response's final reward with its Lagrangian; keep the constrained parts' batch sums."""

    def __init__(
        self,
        input_observation_space=None,
        input_action_space=None,
        *,
        thresholds: dict[str, float],
        multipliers: dict[str, float],
        **kwargs,
    ):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.thresholds, self.multipliers = thresholds, multipliers  # the Learner's dict: updated in place
        self.sums: dict[str, float] = {}
        self.responses = 0

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        sa_episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        self.sums, self.responses = {name: 0.0 for name in self.thresholds}, len(sa_episodes)
        for mbatch in batch.values():
            rewards = mbatch[Columns.REWARDS].clone()
            start = 0
            for episode in sa_episodes:
                info = episode.get_infos(-1)
                last = start + len(episode) - 2  # the response's last token (the row after it is the bootstrap row)
                missing = set(self.thresholds) - set(info["reward_parts"])
                if missing:
                    raise ValueError(
                        f"ppo.constraints names {sorted(missing)}, which the env does not report "
                        f"(its reward parts: {sorted(info['reward_parts'])})"
                    )
                parts = {name: float(info["reward_parts"][name]) for name in self.thresholds}
                rewards[last] = lagrangian_reward(float(info["reward"]), parts, self.multipliers, self.thresholds)
                for name, value in parts.items():
                    self.sums[name] += value
                start += len(episode)
            mbatch[Columns.REWARDS] = rewards
        return batch
