"""The EnvRunner that samples whole responses: exactly the episodes asked for, from its share of the prompts.

RLlib's ``SingleAgentEnvRunner`` with ``sample(num_episodes=n)`` already returns exactly n
finished episodes and drops the sub-environments still running. On its own that favours short
responses (slots that finish early start again and finish first) and re-seeds the env, hence
the prompt stream, on every call. This runner fixes both through the env: it tells the vector
env to hand out exactly n responses (each slot its share, then it parks) and pins the env's
prompt stream to this runner's shard of the common permutation. Each returned episode carries
its group id (unique across runners and calls) in ``custom_data["group"]``. The size of every
weight sync it receives is logged (``weight_sync_bytes``: the whole policy, or only the LoRA adapters).
"""

from __future__ import annotations

import numpy as np
import ray
import tree
from ray.rllib.core import COMPONENT_RL_MODULE
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

    @override(SingleAgentEnvRunner)
    def set_state(self, state) -> None:
        module_state = state.get(COMPONENT_RL_MODULE) if isinstance(state, dict) else None
        if module_state is not None:
            if isinstance(module_state, ray.ObjectRef):
                module_state = ray.get(module_state)
            nbytes = sum(a.nbytes for a in tree.flatten(module_state) if isinstance(a, np.ndarray))
            self.metrics.log_value("weight_sync_bytes", nbytes, reduce="max")
        super().set_state(state)
