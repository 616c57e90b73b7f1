"""The gold annotators: noise-free criteria that label the synthetic preference data and measure alignment.

Each gold criterion scores a response to its prompt, ``fn(prompt, response) -> float``:

- ``positivity``: VADER's compound sentiment of the response, in [-1, 1] (higher = more positive).
- ``consistency``: how well the response keeps the opening's own sentiment,
  ``1 - |VADER(response) - VADER(prompt)| / 2``, in [0, 1]. After a negative opening a glowing
  continuation is inconsistent, so on negative prompts it pulls against positivity.

The policy never sees them unless the env's reward asks for them ('gold', 'gold.<criterion>').
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


@lru_cache(maxsize=4096)
def gold_score(text: str) -> float:
    """VADER compound score of one text (0.0 for empty text)."""
    # Cached: prompts recur in every env step and every consistency score needs the prompt's sentiment.
    return float(_analyzer().polarity_scores(text)["compound"]) if text.strip() else 0.0


def gold_scores(texts: list[str]) -> list[float]:
    """VADER compound scores of many texts."""
    return [gold_score(t) for t in texts]


def gold_positivity(prompt: str, response: str) -> float:
    """Positivity of the response: its VADER compound in [-1, 1] (the prompt plays no part)."""
    return gold_score(response)


def gold_consistency(prompt: str, response: str) -> float:
    """Consistency with the opening's sentiment: 1 - |VADER(response) - VADER(prompt)| / 2, in [0, 1]."""
    return 1.0 - abs(gold_score(response) - gold_score(prompt)) / 2.0


GOLD: dict[str, Callable[[str, str], float]] = {"positivity": gold_positivity, "consistency": gold_consistency}
"""Gold criteria by name; the first is the one the plain 'gold' reward part and ``gold_score`` columns mean."""


def gold_criteria(prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
    """Every gold criterion's score of each (prompt, response): ``{criterion: [score, ...]}``."""
    return {name: [fn(p, r) for p, r in zip(prompts, responses)] for name, fn in GOLD.items()}
