"""Text generation as a Gymnasium environment: one episode is one response to one prompt.

Registered as ``alignray/TextGeneration-v0`` (single env) with a vector entry point
(:class:`envs.text_vector_env.TextGenerationVectorEnv`) that scores the rewards of all
sub-environments that finished in a step with one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.prompt_stream import PromptStream
from envs.prompting import prompt_ids
from envs.rewards import Finished, RewardFunction, load_reward_model

ENV_ID = "alignray/TextGeneration-v0"


@dataclass
class EnvResources:
    """What sub-environments share: tokenizer, prompts (and their stream), reward function, sizes."""

    tokenizer: Any
    vocab_size: int
    prompts: list[str]
    stream: PromptStream
    reward_fn: RewardFunction
    max_new_tokens: int = 24
    max_prompt_tokens: int = 64
    chat_template: bool = True
    instruction: str = ""

    def __post_init__(self) -> None:
        self._ids: dict[int, list[int]] = {}

    def prompt_ids(self, index: int) -> list[int]:
        """Policy token ids of prompt `index` (chat-formatted, left-truncated), cached."""
        if index not in self._ids:
            self._ids[index] = prompt_ids(self.tokenizer, self.prompts[index], self.instruction,
                                          self.chat_template, self.max_prompt_tokens)
        return self._ids[index]


def policy_tokenizer(policy: str, tiny_vocab_size: int = 512) -> tuple[Any, int]:
    """(tokenizer, vocabulary size of the model's output layer) for a policy spec, without loading weights."""
    from policies.models import resolve_model_dir, tiny_tokenizer

    if policy == "tiny":
        tok = tiny_tokenizer()
        return tok, max(tiny_vocab_size, len(tok))
    from transformers import AutoConfig, AutoTokenizer

    where = resolve_model_dir(policy)
    tok = AutoTokenizer.from_pretrained(where)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, int(AutoConfig.from_pretrained(where).get_text_config().vocab_size)


def build_resources(prompts: str | list[str], policy: str = "tiny", tiny_vocab_size: int = 512,
                    split: str = "train", max_prompts: int = 0, max_new_tokens: int = 24,
                    max_prompt_tokens: int = 64, chat_template: bool = True, instruction: str = "",
                    reward: dict[str, float] | None = None, reward_model: str = "",
                    reward_model_backbone: str = "tiny", reward_normalization: bool = True,
                    no_eos_penalty: float = 0.0, reward_batch_size: int = 64, seed: int = 0,
                    reward_model_placement: str = "local") -> EnvResources:
    """Load tokenizer, prompts and reward function once (see :class:`TextGenerationEnv` for the arguments)."""
    from envs.data import load_prompts

    if isinstance(prompts, (str, Path)):
        prompts = load_prompts(prompts, split=split)
    prompts = list(prompts)[: max_prompts or None]
    tok, vocab = policy_tokenizer(policy, tiny_vocab_size)
    weights = dict(reward if reward is not None else {"reward_model": 1.0})
    rm = None
    if "reward_model" in weights and reward_model_placement == "actor":
        from envs.reward_actor import RemoteRewardModel

        rm = RemoteRewardModel()  # started by the driver (policies.train) with the model at `reward_model`
    elif "reward_model" in weights:
        rm = load_reward_model(reward_model, reward_model_backbone)
    fn = RewardFunction(weights, rm, normalize=reward_normalization, no_eos_penalty=no_eos_penalty,
                        batch_size=reward_batch_size)
    return EnvResources(tok, vocab, prompts, PromptStream(len(prompts), seed), fn, max_new_tokens,
                        max_prompt_tokens, chat_template, instruction)


class TextGenerationEnv(gym.Env):
    """Write a response to a prompt, one token per step; the reward scores the finished response.

    ## Action space
    ``Discrete(vocab_size)``: the next token id (vocab_size = the policy's output layer size).

    ## Observation space
    ``Dict(input_ids=Box(0, vocab_size - 1, (max_prompt_tokens + max_new_tokens,), int64),
    length=Discrete(max_prompt_tokens + max_new_tokens + 1))``: the context so far (prompt, then the
    response), right-padded with the pad id; ``length`` counts the real tokens.

    ## Rewards
    0 at every step except the last, which gets the reward function of the decoded response
    (:mod:`envs.rewards`: the learned reward model by default; also 'gold', 'length', 'eos', and
    a weighted sum), plus ``no_eos_penalty`` if the response never wrote EOS. ``info`` on the last
    step reports ``reward_parts`` (each part, unweighted), ``response_tokens``, ``eos``, ``response``.

    ## Starting state
    ``reset`` draws the next prompt from a seeded permutation of the dataset and returns its
    token ids (wrapped in the tokenizer's chat template for instruct models, left-truncated to
    ``max_prompt_tokens``). ``options={"prompt": text}`` uses a given prompt instead.

    ## Episode end
    Terminated when the policy writes EOS; truncated after ``max_new_tokens`` tokens.

    ## Arguments
    ``prompts`` (Parquet path or list of strings), ``policy`` (model spec whose tokenizer the env
    uses; 'tiny' for tests), ``tiny_vocab_size``, ``split``, ``max_prompts``, ``max_new_tokens``,
    ``max_prompt_tokens``, ``chat_template``, ``instruction``, ``reward`` ({part: weight}),
    ``reward_model`` (trained RM directory; with backbone 'tiny' and no directory an untrained
    tiny RM is used), ``reward_model_backbone``, ``reward_normalization``, ``no_eos_penalty``,
    ``reward_batch_size``, ``seed``, ``reward_model_placement`` ('local' or 'actor': one shared
    Ray actor, started beforehand by the driver, scores for every env). ``resources`` lets
    sub-environments share one loaded set.

    Because the env owns the context, :meth:`inject` can add tokens the policy did not write
    (a user turn) before the response; the policy's KV cache treats that as a new context.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(self, prompts: str | list[str] | None = None, *, render_mode: str | None = None,
                 resources: EnvResources | None = None, **kwargs: Any):
        if resources is None:
            if prompts is None:
                raise ValueError("TextGenerationEnv needs `prompts` (a Parquet path or a list of strings)")
            resources = build_resources(prompts, **kwargs)
            self._owns_stream = True
        else:
            self._owns_stream = False
        self.res = resources
        self.render_mode = render_mode
        self.max_len = resources.max_prompt_tokens + resources.max_new_tokens
        self.pad_id = int(resources.tokenizer.pad_token_id)
        self.eos_id = int(resources.tokenizer.eos_token_id)
        self.action_space = spaces.Discrete(resources.vocab_size)
        self.observation_space = spaces.Dict({
            "input_ids": spaces.Box(0, resources.vocab_size - 1, (self.max_len,), np.int64),
            "length": spaces.Discrete(self.max_len + 1),
        })
        self._tokens: list[int] = []
        self._prompt_len = 0
        self._prompt = ""
        self._done = True

    def _obs(self) -> dict[str, np.ndarray]:
        ids = np.full(self.max_len, self.pad_id, dtype=np.int64)
        ids[: len(self._tokens)] = self._tokens
        return {"input_ids": ids, "length": np.int64(len(self._tokens))}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start a response to the next prompt; returns (observation, {"prompt_index": i})."""
        super().reset(seed=seed)
        if seed is not None and self._owns_stream:
            self.res.stream.reseed(seed)
        if options and "prompt" in options:
            index, self._prompt = -1, str(options["prompt"])
            ids = prompt_ids(self.res.tokenizer, self._prompt, self.res.instruction, self.res.chat_template,
                         self.res.max_prompt_tokens)
        else:
            index = self.res.stream.next()
            self._prompt, ids = self.res.prompts[index], self.res.prompt_ids(index)
        self._tokens = list(ids)
        self._prompt_len = len(ids)
        self._done = False
        return self._obs(), {"prompt_index": index}

    def advance(self, action: int) -> tuple[bool, bool]:
        """Append one policy token; return (terminated on EOS, truncated at max_new_tokens)."""
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset()")
        self._tokens.append(int(action))
        terminated = int(action) == self.eos_id
        truncated = not terminated and self.response_tokens >= self.res.max_new_tokens
        self._done = terminated or truncated
        return terminated, truncated

    def inject(self, token_ids: list[int]) -> dict[str, np.ndarray]:
        """Append context tokens the policy did not write (e.g. a user turn) before the response starts.

        They extend the prompt, not the response budget. Mid-response injection (tool results)
        would need the response to be tracked as spans; not supported yet.
        """
        if self.response_tokens:
            raise RuntimeError("inject: only before the policy has written its first token")
        room = self.max_len - len(self._tokens) - self.res.max_new_tokens
        if len(token_ids) > room:
            raise ValueError(f"inject: {len(token_ids)} tokens do not fit ({room} left before max_prompt_tokens)")
        self._tokens.extend(int(t) for t in token_ids)
        self._prompt_len += len(token_ids)
        return self._obs()

    @property
    def response_tokens(self) -> int:
        """Tokens the policy has written in this episode."""
        return len(self._tokens) - self._prompt_len

    def finished(self) -> tuple[str, str, int, bool]:
        """(response text, prompt, response tokens, reached EOS) of the current episode."""
        response = self._tokens[self._prompt_len:]
        eos = bool(response) and response[-1] == self.eos_id
        text = self.res.tokenizer.decode(response, skip_special_tokens=True)
        return text, self._prompt, len(response), eos

    def end_info(self, total: float, parts: dict[str, float]) -> dict[str, Any]:
        """The `info` of an episode's last step."""
        text, _, n, eos = self.finished()
        return {"reward_parts": parts, "reward": total, "response_tokens": n, "eos": eos,
                "response": text, "response_done": True}

    def step(self, action):
        """Append `action`; at the end of the response score it (a batch of one)."""
        terminated, truncated = self.advance(int(action))
        reward, info = 0.0, {}
        if terminated or truncated:
            text, prompt, n, eos = self.finished()
            totals, parts = self.res.reward_fn(Finished([text], [prompt], [n], [eos], self.res.max_new_tokens))
            reward, info = totals[0], self.end_info(totals[0], parts[0])
        return self._obs(), float(reward), terminated, truncated, info

    def render(self):
        """The prompt and the response so far, as text (render_mode 'ansi')."""
        if self.render_mode == "ansi":
            return self._prompt + " ||| " + self.finished()[0]
        return None


def make_text_env(env_config: dict) -> gym.Env | gym.vector.VectorEnv:
    """RLlib env creator: a vector env when RLlib passes ``num_envs``, else a single env."""
    config = dict(env_config)
    num_envs = config.pop("num_envs", None)
    if num_envs is not None:
        from envs.text_vector_env import TextGenerationVectorEnv

        return TextGenerationVectorEnv(num_envs=num_envs, **config)
    return TextGenerationEnv(**config)


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="envs.text_env:TextGenerationEnv",
                 vector_entry_point="envs.text_vector_env:TextGenerationVectorEnv")
