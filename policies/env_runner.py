"""The EnvRunner that samples whole responses: exactly the episodes asked for, from its share of the prompts.

RLlib's ``SingleAgentEnvRunner`` with ``sample(num_episodes=n)`` already returns exactly n
finished episodes and drops the sub-environments still running. On its own that favours short
responses (slots that finish early start again and finish first) and re-seeds the env, hence
the prompt stream, on every call. This runner fixes both through the env: it tells the vector
env to hand out exactly n responses (each slot its share, then it parks) and pins the env's
prompt stream to this runner's shard of the common permutation. Each returned episode carries
its group id (unique across runners and calls) in ``custom_data["group"]``.
"""

from __future__ import annotations

from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.annotations import override

GROUP = "group"


class ResponseEnvRunner(SingleAgentEnvRunner):
    """Samples exactly the requested number of whole responses; each carries its group id."""

    @override(SingleAgentEnvRunner)
    def make_env(self) -> None:
        super().make_env()
        self._calls = 0
        shards = max(self.config.num_env_runners, 1)
        self.env.unwrapped.set_shard(max(self.worker_index - 1, 0), shards)

    @override(SingleAgentEnvRunner)
    def sample(self, *, num_timesteps=None, num_episodes=None, explore=None, random_actions=False, force_reset=False):
        if num_episodes is None:  # timestep sampling (evaluation, tools) keeps RLlib's behaviour
            self.env.unwrapped.set_quota(None)
            return super().sample(
                num_timesteps=num_timesteps, explore=explore, random_actions=random_actions, force_reset=force_reset
            )
        self.env.unwrapped.set_quota(num_episodes)
        episodes = super().sample(num_episodes=num_episodes, explore=explore, random_actions=random_actions)
        self._calls += 1
        for episode in episodes:
            local = episode.get_infos(-1)[GROUP]
            episode.custom_data[GROUP] = f"{self.worker_index}:{self._calls}:{local}"
        return episodes
