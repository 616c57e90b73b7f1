"""One shared reward model in a Ray actor, for ``rollout.reward_model_placement='actor'``.

Every EnvRunner's env gets a :class:`RemoteRewardModel` handle instead of its own copy of the
reward model; the actor (named, created by whichever env asks first) scores their batches.
"""

from __future__ import annotations

ACTOR_NAME = "alignray-reward-model"


class _RewardModelServer:
    """Holds the reward model inside the actor."""

    def __init__(self, path: str, backbone: str):
        from envs.rewards import load_reward_model

        self.rm = load_reward_model(path, backbone)

    def score(self, responses, prompts, batch_size, normalize):
        return self.rm.score(responses, prompts, batch_size=batch_size, normalize=normalize)


class RemoteRewardModel:
    """Drop-in for ``RewardModel.score`` that calls the shared actor."""

    def __init__(self, path: str, backbone: str):
        import ray

        self.actor = ray.remote(num_cpus=0)(_RewardModelServer).options(
            name=ACTOR_NAME, get_if_exists=True).remote(path, backbone)

    def score(self, responses, prompts=None, batch_size=64, normalize=False):
        import ray

        return ray.get(self.actor.score.remote(responses, prompts, batch_size, normalize))
