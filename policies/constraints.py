"""Learner connector: constrained rewards (PPO-Lagrangian), one Lagrange multiplier per constraint.

``ppo.constraints`` maps reward parts to thresholds, ``E[part] >= threshold`` (for example
``{reward_model.consistency: 0.0}``); the objective is the env's weighted reward. Each iteration the
connector first measures every constrained part's sum over the iteration's responses (read from
each episode's :class:`~envs.text_env.ResponseInfo`, pooled across Learners), takes its mean over the
last ``window`` responses (whole iterations, :func:`~policies.ppo_math.recent_iterations`: one iteration's
few dozen responses answer as many new prompts, and their mean swings by more than the drift the
constraint should stop), moves the multipliers by PI control
(:func:`~policies.ppo_math.update_multipliers`), and only then replaces each response's final
reward with :func:`~policies.ppo_math.lagrangian_reward` under those multipliers:
the batch that measured a violation is already trained against it (as Safe-RLHF updates lambda
before its actor loss), instead of one iteration later. Every Learner sees the same pooled means,
so all keep the same multipliers; the Learner saves them, their integrals and the window's history
with its state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.core.columns import Columns
from ray.rllib.utils.annotations import override

from policies.ppo_math import lagrangian_reward, recent_iterations, update_multipliers


class LagrangianReward(ConnectorV2):
    """Measure the constrained parts, step the multipliers, then write each response's Lagrangian reward."""

    def __init__(
        self,
        input_observation_space=None,
        input_action_space=None,
        *,
        thresholds: dict[str, float],
        init: float,
        kp: float,
        ki: float,
        window: int = 0,
        all_reduce_sum: Callable[[list[float]], list[float]],
        **kwargs,
    ):
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self.thresholds, self.kp, self.ki, self.window = thresholds, kp, ki, window
        self.all_reduce_sum = all_reduce_sum
        self.history: dict[str, list[tuple[float, float]]] = {name: [] for name in thresholds}  # (sum, n) per iteration
        self.integrals = {name: init for name in thresholds}
        self.multipliers = {name: init for name in thresholds}
        self.means: dict[str, float] = {}  # E[part] over the window, which the multipliers were stepped from
        self.batch_means: dict[str, float] = {}  # E[part] over the last iteration's responses alone

    @override(ConnectorV2)
    def __call__(self, *, rl_module, batch: dict[str, Any], episodes: list, **kwargs) -> Any:
        sa_episodes = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=False))
        infos = [episode.get_infos(-1) for episode in sa_episodes]
        parts = [self._parts(info) for info in infos]
        self._step(parts)
        for mbatch in batch.values():
            rewards = mbatch[Columns.REWARDS].clone()
            start = 0
            for episode, info, values in zip(sa_episodes, infos, parts):
                last = start + len(episode) - 2  # the response's last token (the row after it is the bootstrap row)
                rewards[last] = lagrangian_reward(float(info["reward"]), values, self.multipliers, self.thresholds)
                start += len(episode)
            mbatch[Columns.REWARDS] = rewards
        return batch

    def _parts(self, info: dict[str, Any]) -> dict[str, float]:
        """The constrained parts of one response's reward."""
        missing = set(self.thresholds) - set(info["reward_parts"])
        if missing:
            raise ValueError(
                f"ppo.constraints names {sorted(missing)}, which the env does not report "
                f"(its reward parts: {sorted(info['reward_parts'])})"
            )
        return {name: float(info["reward_parts"][name]) for name in self.thresholds}

    def _step(self, parts: list[dict[str, float]]) -> None:
        """Pool each part's sum across Learners, average it over the window, then move every multiplier one PI step."""
        names = list(self.thresholds)
        *sums, n = self.all_reduce_sum([sum(p[name] for p in parts) for name in names] + [float(len(parts))])
        self.batch_means = {name: s / n if n else float("nan") for name, s in zip(names, sums)}
        for name, s in zip(names, sums):
            self.history[name] = recent_iterations(self.history[name] + [(s, n)], self.window)
            total, count = (sum(column) for column in zip(*self.history[name]))
            self.means[name] = total / count if count else float("nan")
        integrals, multipliers = update_multipliers(self.integrals, self.means, self.thresholds, self.kp, self.ki)
        self.integrals.update(integrals)
        self.multipliers.update(multipliers)
