"""The PPO algorithm's training step over whole responses: sample exactly N, update, sync weights.

RLlib's ``PPO.training_step`` asks every EnvRunner for timesteps until the batch has enough,
which cuts responses at the end of a sample (the first part trained now, bootstrapped from a
critic, the reward landing on the continuation next iteration). Here each healthy EnvRunner is
asked for its share of exactly ``ppo.episodes_per_iteration`` whole responses (in whole groups);
if one dies mid-sample, its share is asked of the others after RLlib restores what it can, so an
iteration still trains exactly N responses. The Learners get them as :class:`ResponseShards`.
"""

from __future__ import annotations

import numpy as np
from ray.rllib.algorithms.ppo import PPO
from ray.rllib.core import ALL_MODULES
from ray.rllib.utils.annotations import override
from ray.rllib.utils.metrics import (
    ENV_RUNNER_RESULTS,
    ENV_RUNNER_SAMPLING_TIMER,
    LEARNER_RESULTS,
    LEARNER_UPDATE_TIMER,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_MODULE_STEPS_TRAINED_LIFETIME,
    SYNCH_WORKER_WEIGHTS_TIMER,
    TIMERS,
)

from policies.minibatches import ResponseShards


def split_quota(total: int, runners: list[int], unit: int) -> dict[int, int]:
    """Episodes per runner id: `total` spread as evenly as possible in whole units (groups)."""
    groups = np.array_split(np.arange(total // unit), len(runners))
    return {r: len(g) * unit for r, g in zip(runners, groups)}


class ResponsePPO(PPO):
    """PPO whose iterations are exactly ``episodes_per_iteration`` whole responses."""

    @override(PPO)
    def training_step(self) -> None:
        ppo = self.config.learner_config_dict["ppo"]
        # window=1: each iteration reports its own times (RLlib's default EMA would report a slow running mean).
        with self.metrics.log_time((TIMERS, ENV_RUNNER_SAMPLING_TIMER), reduce="mean", window=1):
            episodes, runner_metrics = self._sample_responses(ppo["episodes_per_iteration"], ppo["group_size"])
            self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        with self.metrics.log_time((TIMERS, LEARNER_UPDATE_TIMER), reduce="mean", window=1):
            lifetime = (LEARNER_RESULTS, ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME)
            results = self.learner_group.update(
                training_data=ResponseShards(
                    episodes=episodes, seed=(self.config.seed or 0) * 100_003 + self.iteration
                ),
                timesteps={
                    NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek(
                        (ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)
                    ),
                    NUM_MODULE_STEPS_TRAINED_LIFETIME: self.metrics.peek(lifetime, default=0),
                },
                num_epochs=self.config.num_epochs,
                minibatch_size=self.config.minibatch_size,
                shuffle_batch_per_epoch=False,
            )
            self.metrics.aggregate(results, key=LEARNER_RESULTS)
        with self.metrics.log_time((TIMERS, SYNCH_WORKER_WEIGHTS_TIMER), reduce="mean", window=1):
            self.env_runner_group.sync_weights(
                from_worker_or_learner_group=self.learner_group,
                policies=set(results[0]) - {ALL_MODULES},
                inference_only=True,
            )

    def _sample_responses(self, total: int, unit: int) -> tuple[list, list]:
        """Exactly `total` whole episodes from the EnvRunners (the local one when there are no remote ones)."""
        group = self.env_runner_group
        if group.num_remote_env_runners() == 0:
            runner = group.local_env_runner
            return runner.sample(num_episodes=total), [runner.get_metrics()]
        episodes, metrics, first = [], [], True
        while len(episodes) < total:
            if not first:  # a runner died mid-sample: bring back what RLlib can, ask the healthy ones
                restored = self.restore_env_runners(group)
                if restored:
                    self._make_on_env_runners_recreated_callbacks(
                        config=self.config, env_runner_group=group, restored_env_runner_indices=restored
                    )
            first = False
            ids = sorted(group.healthy_env_runner_ids())
            if not ids:
                raise RuntimeError("no healthy EnvRunner is left to sample from")
            quota = split_quota(total - len(episodes), ids, unit)
            out = group.foreach_env_runner(
                lambda runner, q=quota: (runner.sample(num_episodes=q[runner.worker_index]), runner.get_metrics()),
                local_env_runner=False,
                remote_worker_ids=[i for i in ids if quota[i]],
                timeout_seconds=None,
            )
            for got, runner_metrics in out:
                episodes += got
                metrics.append(runner_metrics)
        return episodes, metrics
