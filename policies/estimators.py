"""Critic-free advantage estimators as plain functions: GRPO, Dr. GRPO, RLOO and REINFORCE++ returns.

Nothing here knows about Ray; each function has hand-worked unit tests in
``tests/policies/test_estimators.py``. A response's *score* is the sum of its token rewards (the
reward model's score on its last token, minus the per-token KL when ``ppo.kl_in='reward'``).
Compared with (cited in the tests): TRL ``GRPOTrainer`` / ``RLOOTrainer`` (grpo_trainer.py,
rloo_trainer.py), veRL ``core_algos.py`` and OpenRLHF ``experience_maker.py``.
"""

from __future__ import annotations

import numpy as np

GRPO_EPS = 1e-4
"""Added to the group's std before dividing (TRL's value)."""


def group_ids(groups: list[str]) -> np.ndarray:
    """Integer id of each response's group, in order of first appearance. (E,)."""
    seen: dict[str, int] = {}
    return np.array([seen.setdefault(g, len(seen)) for g in groups])


def grpo_advantages(scores: np.ndarray, groups: list[str], scale: bool = True) -> np.ndarray:
    """``(r - mean_group) / (std_group + 1e-4)`` with the unbiased std (TRL, veRL); without `scale`, Dr. GRPO's ``r - mean_group``. (E,) -> (E,).

    A group whose rewards are all equal gets 0 (it carries no preference between its responses).
    """
    ids, out = group_ids(groups), np.zeros(len(scores), dtype=np.float64)
    for g in np.unique(ids):
        r = scores[ids == g].astype(np.float64)
        centred = r - r.mean()
        out[ids == g] = centred / (r.std(ddof=1) + GRPO_EPS) if scale and len(r) > 1 else centred
    return out


def rloo_advantages(scores: np.ndarray, groups: list[str]) -> np.ndarray:
    """``r_i - mean of the other k-1 rewards of its group`` = ``k/(k-1) (r_i - mean)`` (TRL, veRL, OpenRLHF). (E,) -> (E,)."""
    ids, out = group_ids(groups), np.zeros(len(scores), dtype=np.float64)
    for g in np.unique(ids):
        r = scores[ids == g].astype(np.float64)
        if len(r) < 2:
            raise ValueError("RLOO needs at least two responses per prompt (ppo.group_size >= 2)")
        out[ids == g] = r - (r.sum() - r) / (len(r) - 1)
    return out


def returns_to_go(rewards: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """REINFORCE++'s per-token returns ``G_t = r_t + gamma G_{t+1}`` over one response. (T,) -> (T,)."""
    out, running = np.zeros(len(rewards), dtype=np.float64), 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out
