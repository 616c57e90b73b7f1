"""Text generation as a Gymnasium environment: one episode is one response to one prompt.

## Description
The policy writes a response to a prompt one token per step; the reward scores the finished
response. Registered as ``alignray/TextGeneration-v0`` by ``import envs``, with a vector entry
point (:class:`envs.text_vector_env.TextGenerationVectorEnv`) that scores every response that
ended in a step with one batched reward call.

## Action space
``Discrete(vocab_size)``: the next token id (vocab_size = the policy's output layer size).

## Observation space
``Dict(input_ids=Box(0, vocab_size - 1, (max_prompt_tokens + max_new_tokens,), int64),
length=Discrete(max_prompt_tokens + max_new_tokens + 1))``: the context so far (prompt, then the
response), right-padded with the pad id; ``length`` counts the real tokens.

## Rewards
0 at every step but the last, which gets the reward function of the decoded response
(:mod:`envs.rewards`: the learned reward model by default; also 'gold', 'length', 'eos', one
criterion's 'reward_model.<criterion>' or 'gold.<criterion>', and a weighted sum), plus
``no_eos_penalty`` if the response never wrote EOS. Every gold criterion, and every reward-model
head when there is a reward model, is reported in ``info`` whether weighted or not. An empty
response (EOS first) gets ``empty_response_score`` as its reward-model parts (the reward model
never saw an empty text); its other parts are computed as for any text (gold 0, length 0, eos 1).
A response of one token is ordinary text. The last step's ``info`` is a :class:`ResponseInfo`.

## Starting state
``reset`` draws the next prompt from a seeded permutation of the dataset (this runner's share of
it when several runners split the data) and returns its token ids, wrapped in the tokenizer's
chat template for instruct models and left-truncated to ``max_prompt_tokens``.
``options={"prompt": text}`` uses a given prompt instead, ``options={"prompt_index": i}`` a given
prompt of the dataset (the vector env gives the k slots of a group the same prompt that way).

## Episode end
Terminated when the policy writes EOS; truncated after ``max_new_tokens`` tokens.

## Arguments
| argument | meaning |
|---|---|
| ``settings`` | :class:`EnvSettings` (or a dict of its fields): lengths, chat template, instruction, reward weights |
| ``model`` | :class:`~envs.models.ModelSettings`: whose tokenizer and vocabulary the env uses |
| ``data`` | :class:`~envs.data.DataSettings`: the prompt file (default: the shipped one) |
| ``prompts`` | a list of prompt strings instead of the file |
| ``reward_model`` | :class:`~envs.reward_model.RewardModelSettings` when the reward uses 'reward_model' or a head of it |
| ``split``, ``seed`` | which split of the prompt file; the prompt order's seed |
| ``shared_reward_actor`` | score through the driver's shared reward-model actor instead of a local copy |

With no arguments (``gym.make(ENV_ID)``) the env uses the shipped prompts, the embedded SmolLM2
tokenizer and the gold reward. The tiny test tokenizer is instant:

>>> import gymnasium as gym, envs
>>> from envs.models import ModelSettings
>>> env = gym.make(envs.ENV_ID, model=ModelSettings(policy="tiny"), settings={"max_new_tokens": 2, "reward": {"length": 1.0}})
>>> obs, info = env.reset(seed=0)
>>> obs, reward, terminated, truncated, info = env.step(10)
>>> obs, reward, terminated, truncated, info = env.step(11)
>>> truncated, reward, info["response_tokens"]
(True, 1.0, 2)

Because the env owns the context, :meth:`TextGenerationEnv.inject` can add tokens the policy did
not write (a user turn) before the response; the policy's KV cache treats that as a new context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from pydantic import Field

from envs.data import DataSettings, load_prompts, resolve_path
from envs.models import ModelSettings, load_tokenizer
from envs.prompt_stream import PromptStream
from envs.prompting import prompt_ids
from envs.reward_actor import RemoteRewardModel
from envs.reward_model import RewardModelSettings
from envs.rewards import Finished, RewardFunction, load_reward_model, uses_reward_model
from envs.settings import Settings


class EnvSettings(Settings):
    """The ``env`` section: lengths, prompt formatting and the reward."""

    max_new_tokens: int = Field(24, ge=1)
    """Episode truncation: tokens the policy may write per response."""
    max_prompt_tokens: int = Field(64, ge=4)
    """Prompts longer than this (in policy tokens, chat template included) are left-truncated."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template when it has one (instruct models)."""
    instruction: str = "Continue this movie review in one or two sentences:"
    """Text placed before each prompt inside the user turn (empty = the prompt alone)."""
    reward: dict[str, float] = Field(default_factory=lambda: {"reward_model": 1.0})
    """Weighted reward parts: 'reward_model', 'gold', 'length', 'eos' (envs.rewards.REWARDS), or one criterion's 'reward_model.<criterion>' / 'gold.<criterion>', weight each."""
    no_eos_penalty: float = 0.0
    """Added to the reward (use a negative number) when a response is truncated before EOS."""
    reward_normalization: bool = True
    """Standardise reward-model scores with the mean/std measured on the preference data."""
    empty_response_score: float = -2.0
    """Reward-model part of an empty response (EOS first), in the reward model's (normalised) units: two standard deviations below the mean by default."""


class ResponseInfo(TypedDict):
    """The ``info`` of an episode's last step: what the response was and how it scored."""

    response_done: bool
    response: str
    response_tokens: int
    eos: bool
    reward: float
    reward_parts: dict[str, float]
    """Each reward part unweighted; 'gold' is always there."""
    prompt_index: int
    group: str
    """Which group of responses to the same prompt this one belongs to (unique within one sample call of a runner)."""


@dataclass
class EnvResources:
    """What sub-environments share: settings, tokenizer, prompts (and their stream), the reward function."""

    settings: EnvSettings
    tokenizer: Any
    vocab_size: int
    prompts: list[str]
    stream: PromptStream
    reward_fn: RewardFunction

    def __post_init__(self) -> None:
        self._ids: dict[int, list[int]] = {}

    def prompt_ids(self, prompt: str, index: int = -1) -> list[int]:
        """Policy token ids of a prompt (chat-formatted, left-truncated); cached by dataset index."""
        if index < 0 or index not in self._ids:
            s = self.settings
            ids = prompt_ids(self.tokenizer, prompt, s.instruction, s.chat_template, s.max_prompt_tokens)
            if index < 0:
                return ids
            self._ids[index] = ids
        return self._ids[index]


def build_resources(
    settings: EnvSettings | dict | None = None,
    *,
    model: ModelSettings | None = None,
    data: DataSettings | None = None,
    prompts: list[str] | None = None,
    reward_model: RewardModelSettings | None = None,
    split: str = "train",
    seed: int = 0,
    shared_reward_actor: bool = False,
) -> EnvResources:
    """Load the tokenizer, prompts and reward function once (the arguments are :class:`TextGenerationEnv`'s)."""
    s = EnvSettings.model_validate(settings or {})
    model, data = model or ModelSettings(), data or DataSettings()
    if prompts is None:
        prompts = load_prompts(resolve_path(data.prompts), split=split)[: data.max_prompts or None]
    tok, vocab = load_tokenizer(model.policy, model.tiny_vocab_size)
    rm = None
    if uses_reward_model(s.reward) and shared_reward_actor:
        rm = RemoteRewardModel()  # started by the driver with the model at reward_model.path
    elif uses_reward_model(s.reward):
        rm = load_reward_model(reward_model or RewardModelSettings())
    batch = (reward_model or RewardModelSettings()).score_batch_size
    fn = RewardFunction(
        dict(s.reward),
        rm,
        normalize=s.reward_normalization,
        no_eos_penalty=s.no_eos_penalty,
        batch_size=batch,
        empty_score=s.empty_response_score,
    )
    return EnvResources(s, tok, vocab, list(prompts), PromptStream(len(prompts), seed), fn)


class TextGenerationEnv(gym.Env):
    """Write a response to a prompt, one token per step; the reward scores the finished response."""

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        settings: EnvSettings | dict | None = None,
        *,
        render_mode: str | None = None,
        resources: EnvResources | None = None,
        **kwargs: Any,
    ):
        self._owns_stream = resources is None
        self.res = resources or build_resources(settings, **kwargs)
        s = self.res.settings
        self.render_mode = render_mode
        self.max_len = s.max_prompt_tokens + s.max_new_tokens
        self.pad_id = int(self.res.tokenizer.pad_token_id)
        self.eos_id = int(self.res.tokenizer.eos_token_id)
        self.action_space = spaces.Discrete(self.res.vocab_size)
        self.observation_space = spaces.Dict(
            {
                "input_ids": spaces.Box(0, self.res.vocab_size - 1, (self.max_len,), np.int64),
                "length": spaces.Discrete(self.max_len + 1),
            }
        )
        self._tokens: list[int] = []
        self._prompt_len = 0
        self._prompt, self._index, self.group = "", -1, ""
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
        options = options or {}
        if "prompt" in options:
            self._index, self._prompt = -1, str(options["prompt"])
        else:
            self._index = int(options["prompt_index"]) if "prompt_index" in options else self.res.stream.next()
            self._prompt = self.res.prompts[self._index]
        self.group = str(options.get("group", self.res.stream.position))
        self._tokens = list(self.res.prompt_ids(self._prompt, self._index))
        self._prompt_len = len(self._tokens)
        self._done = False
        return self._obs(), {"prompt_index": self._index}

    def advance(self, action: int) -> tuple[bool, bool]:
        """Append one policy token; return (terminated on EOS, truncated at max_new_tokens)."""
        if self._done:
            raise RuntimeError("step() called on a finished episode; call reset()")
        self._tokens.append(int(action))
        terminated = int(action) == self.eos_id
        truncated = not terminated and self.response_tokens >= self.res.settings.max_new_tokens
        self._done = terminated or truncated
        return terminated, truncated

    def inject(self, token_ids: list[int]) -> dict[str, np.ndarray]:
        """Append context tokens the policy did not write (e.g. a user turn) before the response starts.

        They extend the prompt, not the response budget. Mid-response injection (tool results)
        would need the response to be tracked as spans; not supported yet.
        """
        if self.response_tokens:
            raise RuntimeError("inject: only before the policy has written its first token")
        room = self.max_len - len(self._tokens) - self.res.settings.max_new_tokens
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
        response = self._tokens[self._prompt_len :]
        eos = bool(response) and response[-1] == self.eos_id
        text = self.res.tokenizer.decode(response, skip_special_tokens=True)
        return text, self._prompt, len(response), eos

    def end_info(self, total: float, parts: dict[str, float]) -> ResponseInfo:
        """The `info` of an episode's last step."""
        text, _, n, eos = self.finished()
        return ResponseInfo(
            response_done=True,
            response=text,
            response_tokens=n,
            eos=eos,
            reward=total,
            reward_parts=parts,
            prompt_index=self._index,
            group=self.group,
        )

    def step(self, action):
        """Append `action`; at the end of the response score it (a batch of one)."""
        terminated, truncated = self.advance(int(action))
        reward, info = 0.0, {}
        if terminated or truncated:
            text, prompt, n, eos = self.finished()
            totals, parts = self.res.reward_fn(Finished([text], [prompt], [n], [eos], self.res.settings.max_new_tokens))
            reward, info = totals[0], self.end_info(totals[0], parts[0])
        return self._obs(), float(reward), terminated, truncated, info

    def render(self):
        """The prompt and the response so far, as text (render_mode 'ansi')."""
        if self.render_mode == "ansi":
            return self._prompt + " ||| " + self.finished()[0]
        return None
