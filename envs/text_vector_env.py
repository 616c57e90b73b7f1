"""Many text-generation episodes stepped together, with one batched reward call per step.

RLlib's ``SingleAgentEnvRunner`` builds its envs with ``gymnasium.make_vec``; with
``gym_env_vectorize_mode="vector_entry_point"`` it calls this class instead of wrapping N
single envs, so the reward model scores every response that ended in a step at once.
Autoreset follows Gymnasium's NEXT_STEP mode (what RLlib expects): the step after a sub-env
finished resets it and ignores its action.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array

from envs.rewards import Finished
from envs.text_env import TextGenerationEnv, build_resources


class TextGenerationVectorEnv(VectorEnv):
    """``num_envs`` :class:`~envs.text_env.TextGenerationEnv` sharing one tokenizer, prompt stream and reward function."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, **kwargs: Any):
        kwargs.pop("render_mode", None)
        self.res = build_resources(**kwargs)
        self.envs = [TextGenerationEnv(resources=self.res) for _ in range(num_envs)]
        self.num_envs = num_envs
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._autoreset = np.zeros(num_envs, dtype=bool)

    def _batch(self, obs: list[dict]) -> dict[str, np.ndarray]:
        # A fresh array each step: RLlib keeps views of what we return in its episodes.
        out = create_empty_array(self.single_observation_space, self.num_envs, fn=np.zeros)
        return concatenate(self.single_observation_space, obs, out)

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        """Reset every sub-env (seeding the shared prompt stream); returns batched (obs, infos)."""
        if seed is not None:
            self.res.stream.reseed(seed if isinstance(seed, int) else seed[0])
        obs, infos = [], {}
        for i, env in enumerate(self.envs):
            o, info = env.reset()
            obs.append(o)
            infos = self._add_info(infos, info, i)
        self._autoreset[:] = False
        return self._batch(obs), infos

    def step(self, actions):
        """Step every sub-env; score all responses that ended here in one reward call."""
        n = self.num_envs
        rewards = np.zeros(n, dtype=np.float64)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        obs, infos, ended = [], {}, []
        for i, env in enumerate(self.envs):
            if self._autoreset[i]:
                o, info = env.reset()
                infos = self._add_info(infos, info, i)
            else:
                terminated[i], truncated[i] = env.advance(int(actions[i]))
                o = env._obs()
                if terminated[i] or truncated[i]:
                    ended.append(i)
            obs.append(o)
        if ended:
            done = [self.envs[i].finished() for i in ended]
            batch = Finished(*(list(col) for col in zip(*done)), self.res.settings.max_new_tokens)
            totals, parts = self.res.reward_fn(batch)
            for i, total, part in zip(ended, totals, parts):
                rewards[i] = total
                infos = self._add_info(infos, self.envs[i].end_info(total, part), i)
        self._autoreset = terminated | truncated
        return self._batch(obs), rewards, terminated, truncated, infos

    def get_data_position(self) -> dict[str, int]:
        """Where the prompt stream is (saved with checkpoints)."""
        return self.res.stream.state()

    def set_data_position(self, state: dict[str, int]) -> None:
        """Continue the prompt stream from a saved position."""
        self.res.stream.restore(state)


def make_text_env(env_config: dict) -> gym.Env | gym.vector.VectorEnv:
    """RLlib env creator: a vector env when RLlib passes ``num_envs``, else a single env."""
    config = dict(env_config)
    num_envs = config.pop("num_envs", None)
    if num_envs is not None:
        return TextGenerationVectorEnv(num_envs=num_envs, **config)
    return TextGenerationEnv(**config)
