"""Reward functions for a finished response, and their weighted composition.

Every part scores a batch of finished responses at once (the vector env scores all episodes
that ended in one env step with one call). Parts:

- ``reward_model``: the learned reward model's score (standardised with the mean/std saved at
  RM training time when ``normalize``). An empty response (EOS first, or only whitespace) is not
  shown to the reward model, which never saw one in training: it scores ``empty_score``.
- ``gold``: the gold annotator (VADER compound in [-1, 1]); always reported in ``info``.
- ``length``: response tokens / max_new_tokens, in [0, 1].
- ``eos``: 1 if the response ended with EOS, else 0.

The total is ``sum(weight * part) + no_eos_penalty * (not reached_eos)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from envs.data import resolve_path
from envs.gold import gold_scores
from envs.models import ModelLoadError
from envs.reward_model import META_FILE, RewardModel, RewardModelSettings


@dataclass
class Finished:
    """Finished responses to score (parallel lists)."""

    responses: list[str]
    prompts: list[str]
    n_tokens: list[int]
    reached_eos: list[bool]
    max_new_tokens: int


def length_reward(batch: Finished) -> list[float]:
    """Response length as a fraction of the budget."""
    return [n / batch.max_new_tokens for n in batch.n_tokens]


def eos_reward(batch: Finished) -> list[float]:
    """1.0 for a response that ended with EOS, else 0.0."""
    return [1.0 if e else 0.0 for e in batch.reached_eos]


def gold_reward(batch: Finished) -> list[float]:
    """The gold annotator's score of each response."""
    return gold_scores(batch.responses)


def compose(
    parts: dict[str, list[float]], weights: dict[str, float], reached_eos: Sequence[bool], no_eos_penalty: float = 0.0
) -> list[float]:
    """Weighted sum of reward parts plus the no-EOS penalty for responses that never reached EOS."""
    n = len(reached_eos)
    total = [0.0] * n
    for name, w in weights.items():
        total = [t + w * p for t, p in zip(total, parts[name])]
    return [t + (0.0 if e else no_eos_penalty) for t, e in zip(total, reached_eos)]


def load_reward_model(s: RewardModelSettings) -> RewardModel:
    """The trained RM at ``s.path``; for backbone 'tiny' without one, an untrained tiny RM (tests need no training)."""
    path = resolve_path(s.path)
    if (path / META_FILE).exists():
        return RewardModel.load(path)
    if s.backbone == "tiny":
        return RewardModel.untrained(s)
    raise ModelLoadError(f"reward model {s.path!r}: not found; run `alignray train-rm` first")


@dataclass
class RewardFunction:
    """Scores batches of finished responses: ``__call__(batch) -> (totals, parts)``."""

    weights: dict[str, float]
    reward_model: RewardModel | None = None
    normalize: bool = True
    no_eos_penalty: float = 0.0
    batch_size: int = 64
    empty_score: float = -2.0
    parts: dict[str, Callable[[Finished], list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(REWARDS) - set(self.parts)
        if unknown:
            raise ValueError(f"env.reward: unknown reward part(s) {sorted(unknown)} (known: {sorted(REWARDS)})")
        if "reward_model" in self.weights and self.reward_model is None:
            raise ValueError("env.reward uses 'reward_model' but no reward model was given")

    def rm_reward(self, batch: Finished) -> list[float]:
        """The reward model's (optionally standardised) score of each response; ``empty_score`` for an empty one."""
        assert self.reward_model is not None
        kept = [i for i, r in enumerate(batch.responses) if r.strip()]
        scores = [self.empty_score] * len(batch.responses)
        if kept:
            got = self.reward_model.score(
                [batch.responses[i] for i in kept],
                [batch.prompts[i] for i in kept],
                batch_size=self.batch_size,
                normalize=self.normalize,
            )
            for i, s in zip(kept, got):
                scores[i] = s
        return scores

    def __call__(self, batch: Finished) -> tuple[list[float], list[dict[str, float]]]:
        """(total reward of each response, {part: value} of each response); 'gold' is always reported."""
        if not batch.responses:
            return [], []
        fns = {**REWARDS, **self.parts, "reward_model": self.rm_reward}
        names = list(dict.fromkeys([*self.weights, "gold"] + (["reward_model"] if self.reward_model else [])))
        parts = {name: fns[name](batch) for name in names}
        totals = compose(parts, self.weights, batch.reached_eos, self.no_eos_penalty)
        per_item = [{name: float(parts[name][i]) for name in names} for i in range(len(totals))]
        return totals, per_item


REWARDS: dict[str, Callable[[Finished], list[float]]] = {
    "reward_model": lambda batch: [],  # bound per RewardFunction (needs the model)
    "gold": gold_reward,
    "length": length_reward,
    "eos": eos_reward,
}
"""Reward parts by name (the names `env.reward` weights)."""
