"""An endless, seeded, resumable stream of prompt indices: a fresh permutation per pass, split between runners.

Pass k over the data is ``permutation(seed, k)``. With several EnvRunners each one is a shard of
the same stream: runner ``shard`` of ``shards`` takes every ``shards``-th prompt of it, so within a
pass no two runners draw the same prompt and together they cover the data once.
"""

from __future__ import annotations

import numpy as np


class PromptStream:
    """Yields indices into a prompt list; ``(seed, position)`` is the whole state (position counts this shard's draws)."""

    def __init__(self, n: int, seed: int = 0, shard: int = 0, shards: int = 1):
        if n <= 0:
            raise ValueError("the prompt dataset is empty")
        self.n = n
        self.shard_as(shard, shards)
        self.reseed(seed)

    def shard_as(self, shard: int, shards: int) -> None:
        """Draw only this runner's share: positions ``shard, shard + shards, ...`` of the common stream."""
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} of {shards}")
        self.shard, self.shards = shard, shards

    def reseed(self, seed: int) -> None:
        """Restart the stream for `seed` at position 0."""
        self.seed, self.position = int(seed), 0
        self._pass, self._perm = -1, np.arange(self.n)

    def next(self) -> int:
        """The next prompt index."""
        k, i = divmod(self.position * self.shards + self.shard, self.n)
        if k != self._pass:
            self._pass, self._perm = k, np.random.default_rng([self.seed, k]).permutation(self.n)
        self.position += 1
        return int(self._perm[i])

    def state(self) -> dict[str, int]:
        """``{"seed", "position"}``: enough to continue the stream later."""
        return {"seed": self.seed, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from `state`."""
        self.reseed(int(state["seed"]))
        self.position = int(state["position"])
