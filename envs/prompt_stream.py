"""An endless, seeded, resumable stream of prompt indices (a fresh permutation per pass)."""

from __future__ import annotations

import numpy as np


class PromptStream:
    """Yields indices into a prompt list: pass k over the data is ``permutation(seed, k)``.

    ``position`` counts prompts drawn so far, so ``(seed, position)`` is the whole state; a run
    resumed with :meth:`restore` continues with the prompts that come next.
    """

    def __init__(self, n: int, seed: int = 0):
        if n <= 0:
            raise ValueError("the prompt dataset is empty")
        self.n = n
        self._restored: tuple[int, int] | None = None
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the stream for `seed` (at a restored position if one is pending for this seed)."""
        self.seed = int(seed)
        self.position = 0
        if self._restored is not None and self._restored[0] == self.seed:
            self.position = self._restored[1]
        self._restored = None
        self._pass, self._perm = -1, np.arange(self.n)

    def next(self) -> int:
        """The next prompt index."""
        k, i = divmod(self.position, self.n)
        if k != self._pass:
            self._pass, self._perm = k, np.random.default_rng([self.seed, k]).permutation(self.n)
        self.position += 1
        return int(self._perm[i])

    def state(self) -> dict[str, int]:
        """``{"seed", "position"}``: enough to continue the stream later."""
        return {"seed": self.seed, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from `state`; survives the seeded reset an RLlib EnvRunner does on its first sample."""
        self._restored = (int(state["seed"]), int(state["position"]))
        self.reseed(int(state["seed"]))
        self._restored = (int(state["seed"]), int(state["position"]))
