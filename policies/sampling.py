"""Token sampling with temperature, top-k and top-p, and the log-probabilities PPO uses.

The log-probability of a sampled token is taken under the temperature-scaled *full*
distribution (as TRL does): the learner recomputes exactly that quantity, so the PPO ratio
is 1 at the first minibatch. Top-k / top-p truncation only shapes which tokens are drawn.
"""

from __future__ import annotations

import torch


def scaled_logp(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-softmax of ``logits / temperature``. (..., V) -> (..., V)."""
    logits = logits.float()
    return torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k tokens and outside the top-p nucleus to -inf. (B, V) -> (B, V)."""
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return (tokens (B,), their log-prob under the tempered full distribution (B,))."""
    logp = scaled_logp(logits, temperature)  # (B, V)
    probs = torch.softmax(filter_logits(logp, top_k, top_p), dim=-1)
    tokens = inverse_cdf(probs, torch.rand(probs.shape[0], generator=generator, device=probs.device))
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token of each row whose cumulative-probability interval holds u (uniform in [0, 1)). (B, V), (B,) -> (B,).

    Exact sampling, and on a CPU about 20x faster than torch.multinomial over a 49k-token
    vocabulary (1.5 ms vs 29 ms at B=32, which was an eighth of an EnvRunner step).
    """
    cdf = probs.cumsum(-1)  # (B, V)
    tokens = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(-1)  # (B,)
    # u * total can round up to the total (about 1 draw in 2^24): take the likeliest token, never a filtered one.
    return torch.where(tokens < probs.shape[-1], tokens, probs.argmax(-1))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row. (B, V) -> (B,)."""
    return logits.argmax(-1)
