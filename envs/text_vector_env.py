"""Many text-generation episodes stepped together, with one batched reward call per step.

RLlib's ``SingleAgentEnvRunner`` builds its envs with ``gymnasium.make_vec``; with
``gym_env_vectorize_mode="vector_entry_point"`` it calls this class instead of wrapping N
single envs, so the reward model scores every response that ended in a step at once.
Autoreset follows Gymnasium's NEXT_STEP mode (what RLlib expects): the step after a sub-env
finished resets it and ignores its action.

Whole responses per iteration. :meth:`TextGenerationVectorEnv.set_quota` makes the next
:meth:`reset` hand out exactly that many episodes: each slot serves its share, then *parks* (a
one-token context that never ends, gets reward 0 and draws no prompt). An EnvRunner asked for
exactly that many episodes therefore returns whole responses only, none cut and none favoured
for being short, and no prompt is drawn for a response that is thrown away.

Groups. With ``group_size`` k > 1 the slots form groups of k consecutive slots; the r-th
response of every slot of a group answers the group's r-th prompt, so each prompt is answered k
times in one sample (GRPO, RLOO). Every response's ``info["group"]`` names its group.
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

    def __init__(self, num_envs: int = 1, group_size: int = 1, **kwargs: Any):
        if group_size < 1 or num_envs % group_size:
            raise ValueError(f"num_envs ({num_envs}) must be a multiple of the group size ({group_size})")
        kwargs.pop("render_mode", None)
        self.res = build_resources(**kwargs)
        self.envs = [TextGenerationEnv(resources=self.res) for _ in range(num_envs)]
        self.num_envs, self.group_size = num_envs, group_size
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._autoreset = np.zeros(num_envs, dtype=bool)
        self._quota: list[int] | None = None  # episodes per slot after the next reset (None: endless)
        self._served = [0] * num_envs
        self._parked = np.zeros(num_envs, dtype=bool)
        self._group_prompts: dict[tuple[int, int], int] = {}
        self._pinned = False  # an EnvRunner owns the stream's seed and shard: reset seeds leave it alone
        empty = self.envs[0]
        self._parked_obs = {"input_ids": np.full(empty.max_len, empty.pad_id, np.int64), "length": np.int64(1)}

    def _batch(self, obs: list[dict]) -> dict[str, np.ndarray]:
        # A fresh array each step: RLlib keeps views of what we return in its episodes.
        out = create_empty_array(self.single_observation_space, self.num_envs, fn=np.zeros)
        return concatenate(self.single_observation_space, obs, out)

    def set_shard(self, index: int, count: int) -> None:
        """Draw only share `index` of `count` of the prompt stream (one per EnvRunner), whatever seeds reset gets."""
        self.res.stream.shard_as(index, count)
        self._pinned = True

    def set_quota(self, episodes: int | None) -> None:
        """After the next reset, hand out exactly `episodes` responses (None: endless), in whole groups."""
        if episodes is None:
            self._quota = None
            return
        groups = self.num_envs // self.group_size
        if episodes % self.group_size:
            raise ValueError(f"{episodes} episodes do not make whole groups of {self.group_size}")
        per_group = [len(a) for a in np.array_split(np.arange(episodes // self.group_size), groups)]
        self._quota = [per_group[i // self.group_size] for i in range(self.num_envs)]

    def _start(self, i: int) -> tuple[dict, dict]:
        """Start slot i's next response (its group's prompt for this round), or park the slot when its share is done."""
        if self._quota is not None and self._served[i] >= self._quota[i]:
            self._parked[i] = True
            return self._parked_obs, {}
        key = (i // self.group_size, self._served[i])
        if key not in self._group_prompts:
            self._group_prompts[key] = self.res.stream.next()
        return self.envs[i].reset(options={"prompt_index": self._group_prompts[key], "group": f"g{key[0]}.{key[1]}"})

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        """Reset every sub-env (seeding the shared prompt stream unless a runner pinned it); batched (obs, infos)."""
        if seed is not None and not self._pinned:
            self.res.stream.reseed(seed if isinstance(seed, int) else seed[0])
        self._served = [0] * self.num_envs
        self._parked[:] = False
        self._group_prompts.clear()
        obs, infos = [], {}
        for i in range(self.num_envs):
            o, info = self._start(i)
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
            if self._parked[i]:
                o = self._parked_obs
            elif self._autoreset[i]:
                o, info = self._start(i)
                infos = self._add_info(infos, info, i)
            else:
                terminated[i], truncated[i] = env.advance(int(actions[i]))
                o = env._obs()
                if terminated[i] or truncated[i]:
                    ended.append(i)
                    self._served[i] += 1
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
    config.pop("group_size", None)
    return TextGenerationEnv(**config)
