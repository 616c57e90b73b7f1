"""Token sampling with temperature, top-k and top-p: the one sampler of training, evaluation and serving.

:func:`sample_tokens` returns each drawn token with its log-probability under the distribution
it was actually drawn from (tempered, and filtered when top-k/top-p are on). Training refuses
top-k/top-p (``PPOSettings``), so there that distribution is the tempered full softmax the
learner recomputes, and the PPO ratio is exactly 1 before the first update. Every parameter can
be one number or one value per row (serving batches requests with different settings).
"""

from __future__ import annotations

import torch

Param = float | torch.Tensor
"""A sampling parameter: one number for every row, or a (B, 1) tensor with one per row."""


def scaled_logp(logits: torch.Tensor, temperature: Param = 1.0) -> torch.Tensor:
    """Log-softmax of ``logits / temperature`` in float32. (..., V) -> (..., V)."""
    logits = logits.float()
    if isinstance(temperature, torch.Tensor) or temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: Param = 1.0) -> torch.Tensor:
    """Set logits outside the top-k tokens and outside the top-p nucleus to -inf. (B, V) -> (B, V)."""
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if isinstance(top_p, torch.Tensor) or top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        p = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass ranked above it already reaches top_p (the first token always stays).
        drop_sorted = (p.cumsum(-1) - p) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    temperature: Param = 1.0,
    top_k: int = 0,
    top_p: Param = 1.0,
    u: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of logits (B, V) -> (tokens (B,), log-prob of each under the distribution drawn from (B,)).

    ``u`` (B,) are the uniforms to draw with (serving keeps one generator per request), else taken
    from ``generator``. A row with temperature 0 takes its most likely token (log-prob 0).
    """
    t = torch.as_tensor(temperature, dtype=torch.float32)
    greedy = (t == 0).reshape(-1)  # (1,) or (B,)
    logp = scaled_logp(filter_logits(logits.float(), top_k, top_p), torch.where(t == 0, 1.0, t))  # (B, V)
    if u is None:
        u = torch.rand(logp.shape[0], generator=generator, device=logp.device)
    tokens = torch.where(greedy, logits.argmax(-1), inverse_cdf(logp.exp(), u))
    return tokens, torch.where(greedy, 0.0, logp.gather(-1, tokens[:, None]).squeeze(-1))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token of each row whose cumulative-probability interval holds u (uniform in [0, 1)). (B, V), (B,) -> (B,).

    Exact sampling, and on a CPU about 20x faster than torch.multinomial over a 49k-token
    vocabulary (1.5 ms vs 29 ms at B=32, which was an eighth of an EnvRunner step).
    """
    cdf = probs.cumsum(-1)  # (B, V)
    tokens = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(-1)  # (B,)
    # u * total can round up to the total (about 1 draw in 2^24): take the likeliest token, never a filtered one.
    return torch.where(tokens < probs.shape[-1], tokens, probs.argmax(-1))
