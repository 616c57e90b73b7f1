"""How an iteration's responses are split: into equal shards per Learner, then into minibatches of whole responses.

RLlib's defaults cut by timesteps: shards are balanced by tokens (slicing a response in two
across Learners) and its cyclic minibatch iterator wraps around, training some rows twice per
epoch and, with several Learners, dropping others. Here the unit is a group of responses (one
response each unless GRPO/RLOO sample several per prompt):

- :class:`ResponseShards` gives every Learner the same number of whole groups (so every Learner
  takes the same number of DDP steps);
- :class:`ResponseMinibatches` shuffles a Learner's groups with a seed, once per epoch, and yields
  ``groups_per_minibatch`` of them at a time: every token is trained exactly ``epochs`` times and
  each response's rows (its tokens plus RLlib's bootstrap row) stay contiguous, so they pack into
  one causal pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
from ray.rllib.core.learner.training_data import TrainingData
from ray.rllib.policy.sample_batch import MultiAgentBatch, concat_samples

from policies.env_runner import GROUP


def group_units(episodes: list) -> list[list[int]]:
    """Indices of the episodes of each group, groups in order of first appearance."""
    units: dict[str, list[int]] = {}
    for i, episode in enumerate(episodes):
        units.setdefault(str(episode.custom_data.get(GROUP, episode.id_)), []).append(i)
    return list(units.values())


@dataclasses.dataclass
class ResponseShards(TrainingData):
    """Episodes that shard into equal numbers of whole groups per Learner (the driver calls :meth:`shard`)."""

    seed: int = 0

    def shard(self, num_shards: int, len_lookback_buffer: int | None = None, **kwargs):
        """``num_shards`` (TrainingData, kwargs) pairs, each with the same number of whole groups."""
        units = group_units(self.episodes)
        if len(units) % num_shards:
            raise ValueError(
                f"{len(units)} response groups do not split evenly over {num_shards} Learners; "
                "make ppo.episodes_per_iteration a multiple of rollout.num_learners x ppo.group_size"
            )
        order = np.random.default_rng(self.seed).permutation(len(units))
        per = len(units) // num_shards
        return [
            (TrainingData(episodes=[self.episodes[i] for u in order[s * per : (s + 1) * per] for i in units[u]]), {})
            for s in range(num_shards)
        ]


class ResponseMinibatches:
    """Minibatches of whole groups of responses: each epoch a fresh seeded order, every row exactly once.

    ``lengths``: rows of each episode in the batch, in batch order (tokens + 1 bootstrap row);
    ``units``: the episodes of each group. Yields ``MultiAgentBatch`` minibatches.
    """

    def __init__(
        self,
        batch: MultiAgentBatch,
        lengths: list[int],
        units: list[list[int]],
        groups_per_minibatch: int,
        epochs: int,
        rng: np.random.Generator,
    ):
        ((self.module_id, self.rows),) = batch.policy_batches.items()
        if len(self.rows) != sum(lengths):
            raise RuntimeError(f"the batch has {len(self.rows)} rows but its episodes {sum(lengths)}")
        if len(units) % groups_per_minibatch:
            raise ValueError(f"{len(units)} groups do not make whole minibatches of {groups_per_minibatch}")
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.spans = [[(int(starts[i]), int(lengths[i])) for i in unit] for unit in units]
        self.per, self.epochs, self.rng = groups_per_minibatch, epochs, rng

    def __len__(self) -> int:
        return self.epochs * len(self.spans) // self.per

    def __iter__(self) -> Iterator[MultiAgentBatch]:
        for _ in range(self.epochs):
            for chunk in self.rng.permutation(len(self.spans)).reshape(-1, self.per):
                spans = [span for j in chunk for span in self.spans[j]]
                rows = concat_samples([self.rows[start : start + n] for start, n in spans])
                yield MultiAgentBatch({self.module_id: rows}, env_steps=sum(n - 1 for _, n in spans))
