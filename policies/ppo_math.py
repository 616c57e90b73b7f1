"""The maths of RLHF-PPO as plain functions: KL estimates, reward shaping, GAE, whitening, losses, KL control.

Nothing here knows about Ray or RLlib; every function has a hand-checked unit test in
``tests/policies/test_ppo_math.py``. Shapes: ``N`` rows (one per generated token), ``T``
timesteps of one episode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate ``log pi(a) - log pi_ref(a)`` for a sampled from pi (unbiased, can be < 0). (N,) -> (N,)."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate ``exp(r) - 1 - r`` with ``r = log pi_ref - log pi`` (Schulman's k3; >= 0). (N,) -> (N,)."""
    r = ref_logp - logp
    return torch.expm1(r) - r


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL estimate ``(log pi(a) - log pi_ref(a))^2 / 2`` (biased, >= 0; as a loss its gradient is the reverse KL's). (N,) -> (N,)."""
    return 0.5 * (logp - ref_logp) ** 2


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
"""Per-token KL estimators by name (``ppo.kl_estimator``)."""


def shape_rewards(rewards: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """KL-shaped rewards ``r_t - beta * kl_t`` on valid rows; masked rows keep their reward. (N,) -> (N,)."""
    return torch.where(mask, rewards - kl_coef * kl, rewards)


def gae(
    rewards: np.ndarray, values: np.ndarray, bootstrap: float, gamma: float, lambda_: float
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation over one episode (chunk).

    ``rewards``, ``values``: (T,); ``bootstrap``: V(s_T) after the last step (0 if the response ended).
    ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)``, ``A_t = delta_t + gamma lambda A_{t+1}``.
    Returns (advantages (T,), value targets = advantages + values (T,)).
    """
    T = len(rewards)
    next_values = np.append(values[1:], bootstrap).astype(np.float64)  # (T,)
    deltas = rewards + gamma * next_values - values  # (T,)
    adv = np.zeros(T, dtype=np.float64)
    running = 0.0
    for t in reversed(range(T)):
        running = deltas[t] + gamma * lambda_ * running
        adv[t] = running
    return adv.astype(np.float32), (adv + values).astype(np.float32)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of x over rows where mask is True (all rows if mask is None). (N,) -> ()."""
    if mask is None:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Standardise x to zero mean and unit (population) std over valid rows. (N,) -> (N,)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps)


def pg_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate: ``mean(max(-A r, -A clip(r, 1-eps, 1+eps)))`` with ``r = exp(logp - old_logp)``.

    Returns (loss (), fraction of rows where the clipped term was active ()).
    """
    ratio = torch.exp(logp - old_logp)  # (N,)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, targets: torch.Tensor, clip: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """PPO2 clipped value loss ``0.5 mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))``. (N,) -> ()."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    losses = torch.maximum((values - targets) ** 2, (v_clipped - targets) ** 2)
    return 0.5 * masked_mean(losses, mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution of each row. (N, V) -> (N,)."""
    return entropy_from_logp(torch.log_softmax(logits, dim=-1))


def entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of each row given its normalised log-probabilities. (N, V) -> (N,)."""
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """``1 - Var(targets - values) / Var(targets)`` over valid rows: 1 for a perfect critic, 0 for a constant one."""
    var = masked_mean((targets - masked_mean(targets, mask)) ** 2, mask)
    resid = targets - values
    resid_var = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return float(1.0 - resid_var / var) if var > 0 else float("nan")


@dataclass
class KLController:
    """KL-to-reference coefficient: fixed (``target == 0``) or adaptive (Ziegler et al. 2019).

    Adaptive: ``e = clip(KL / target - 1, -0.2, 0.2)``, ``coef *= 1 + e / horizon`` after every
    iteration, where KL is the iteration's mean per-response KL (nats). Ziegler et al. write
    ``1 + e * n / H`` with n responses per step and H in responses; here ``horizon = H / n`` is
    counted in iterations, so a run of a few dozen iterations can reach its target (with H = 10,000
    responses and 32 per iteration, ten iterations could move the coefficient by 0.6% at most).
    """

    coef: float
    target: float = 0.0
    horizon: float = 2.0

    def update(self, kl: float) -> float:
        """Move the coefficient after an iteration whose mean per-response KL was `kl`."""
        if self.target > 0 and np.isfinite(kl):
            error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
            self.coef *= 1.0 + error / self.horizon
        return self.coef


def lagrangian_reward(
    objective: float, parts: dict[str, float], multipliers: dict[str, float], thresholds: dict[str, float]
) -> float:
    """``(objective + sum_j lambda_j (part_j - b_j)) / (1 + sum_j lambda_j)``: the Lagrangian of max E[objective] s.t. E[part_j] >= b_j.

    Dividing by ``1 + sum lambda`` keeps the reward's scale as the multipliers grow (Safe-RLHF's PPO-Lagrangian).
    """
    total = objective + sum(lam * (parts[name] - thresholds[name]) for name, lam in multipliers.items())
    return total / (1.0 + sum(multipliers.values()))


def recent_iterations(history: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """The fewest most recent iterations holding ``window`` responses (all of them if fewer), oldest first.

    ``history`` holds one ``(sum, count)`` of a part per iteration, oldest first; ``window <= 1`` keeps
    the last iteration with responses. A constraint's mean is taken over these: Safe-RLHF drives its
    multiplier the same way (the mean cost over its last ``episode_cost_window_size`` episodes),
    because one batch's mean is too noisy to steer by.
    """
    kept, n = [], 0.0
    for entry in reversed(history):
        if n >= max(window, 1):
            break
        kept.append(entry)
        n += entry[1]
    return kept[::-1]


def update_multipliers(
    integrals: dict[str, float], means: dict[str, float], thresholds: dict[str, float], kp: float, ki: float
) -> tuple[dict[str, float], dict[str, float]]:
    """PI control of each Lagrange multiplier from its constraint's measured ``E[part]`` (Stooke et al. 2020).

    With the error ``e = b - E[part]`` (> 0 while violated):
    ``I <- max(0, I + ki e)`` (the integral: projected gradient ascent on lambda, the plain update) and
    ``lambda = max(0, I + kp e)`` (the proportional term reacts to this measurement at once, and leaves
    nothing behind when the constraint is met again). ``kp = 0`` is the plain update, ``lambda = I``.
    A nan mean (no responses) leaves the integral where it is, and ``lambda = I``. Returns ``(integrals, multipliers)``.
    """
    errors = {name: thresholds[name] - means[name] if np.isfinite(means[name]) else 0.0 for name in integrals}
    new = {name: max(0.0, i + ki * errors[name]) for name, i in integrals.items()}
    return new, {name: max(0.0, i + kp * errors[name]) for name, i in new.items()}
