"""Reward functions for a finished response, and their weighted composition.

Every part scores a batch of finished responses at once (the vector env scores all episodes
that ended in one env step with one call). Parts:

- ``reward_model``: the learned reward model's first head (standardised with the mean/std saved
  at RM training time when ``normalize``); ``reward_model.<criterion>``: each of its heads, all of
  them from one batched ``score_all`` call. An empty response (EOS first, or only whitespace) is
  not shown to the reward model, which never saw one in training: every head scores
  ``empty_score``.
- ``gold``: the gold annotator's positivity (VADER compound in [-1, 1]); ``gold.<criterion>``:
  each gold criterion of :data:`envs.gold.GOLD` (``gold.positivity`` is ``gold``).
- ``length``: response tokens / max_new_tokens, in [0, 1].
- ``eos``: 1 if the response ended with EOS, else 0.

Every gold criterion, and every reward-model head when there is a reward model, is reported in
each response's parts whether weighted or not; the total is
``sum(weight * part) + no_eos_penalty * (not reached_eos)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from envs.data import NAME_PATTERN, resolve_path
from envs.gold import GOLD, gold_criteria, gold_scores
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


RM_PART = "reward_model"
GOLD_PART = "gold"


def uses_reward_model(weights: dict[str, float] | list[str]) -> bool:
    """True if any weighted part is the reward model's ('reward_model' or 'reward_model.<criterion>')."""
    return any(n == RM_PART or n.startswith(RM_PART + ".") for n in weights)


def check_part_names(names: list[str], heads: list[str] | None = None, extra: list[str] = ()) -> None:
    """Raise ValueError naming any unknown reward part; 'reward_model.<c>' must name one of `heads` when given."""
    gold = [f"{GOLD_PART}.{c}" for c in GOLD]
    known = [*REWARDS, *gold, *extra] + [f"{RM_PART}.{c}" for c in heads or []]
    for name in names:
        head = name.removeprefix(RM_PART + ".") if name.startswith(RM_PART + ".") else None
        if name in known or (heads is None and head is not None and NAME_PATTERN.fullmatch(head)):
            continue
        hint = f"; the reward model's heads: {heads}" if head is not None and heads is not None else ""
        raise ValueError(
            f"env.reward: unknown reward part {name!r} (known: {sorted(set(known))}, 'reward_model.<criterion>'){hint}"
        )


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
        heads = list(getattr(self.reward_model, "criteria", [])) if self.reward_model is not None else None
        check_part_names(list(self.weights), heads, list(self.parts))
        if uses_reward_model(self.weights) and self.reward_model is None:
            raise ValueError("env.reward uses 'reward_model' but no reward model was given")

    def rm_parts(self, batch: Finished) -> dict[str, list[float]]:
        """Every head's (optionally standardised) score from one batched call: 'reward_model' (first head) and 'reward_model.<c>'."""
        assert self.reward_model is not None
        kept = [i for i, r in enumerate(batch.responses) if r.strip()]
        got = self.reward_model.score_all(
            [batch.responses[i] for i in kept],
            [batch.prompts[i] for i in kept],
            batch_size=self.batch_size,
            normalize=self.normalize,
        )
        out = {}
        for c, scores in got.items():
            full = [self.empty_score] * len(batch.responses)
            for i, s in zip(kept, scores):
                full[i] = s
            out[f"{RM_PART}.{c}"] = full
        return {RM_PART: out[f"{RM_PART}.{next(iter(got))}"], **out}

    def rm_reward(self, batch: Finished) -> list[float]:
        """The first head's (optionally standardised) score of each response; ``empty_score`` for an empty one."""
        return self.rm_parts(batch)[RM_PART]

    def __call__(self, batch: Finished) -> tuple[list[float], list[dict[str, float]]]:
        """(total reward of each response, {part: value} of each response); gold criteria and RM heads always reported."""
        if not batch.responses:
            return [], []
        golds = gold_criteria(batch.prompts, batch.responses)
        parts = {GOLD_PART: golds[next(iter(GOLD))], **{f"{GOLD_PART}.{c}": v for c, v in golds.items()}}
        if self.reward_model is not None:
            parts.update(self.rm_parts(batch))
        for name in self.weights:  # the rule parts, and custom ones (which win over a built-in name)
            if name in self.parts or name not in parts:
                parts[name] = {**REWARDS, **self.parts}[name](batch)
        totals = compose(parts, self.weights, batch.reached_eos, self.no_eos_penalty)
        per_item = [{name: float(v[i]) for name, v in parts.items()} for i in range(len(totals))]
        return totals, per_item


REWARDS: dict[str, Callable[[Finished], list[float]]] = {
    "reward_model": lambda batch: [],  # bound per RewardFunction (needs the model)
    "gold": gold_reward,
    "length": length_reward,
    "eos": eos_reward,
}
"""Reward parts by name (the names `env.reward` weights)."""
