"""The gold annotator: VADER's compound sentiment score in [-1, 1], higher is more positive.

It labels the synthetic preference data and measures alignment in evaluation; the policy
never sees it unless the env's reward asks for it ('gold').
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _analyzer():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def gold_score(text: str) -> float:
    """VADER compound score of one text (0.0 for empty text)."""
    return float(_analyzer().polarity_scores(text)["compound"]) if text.strip() else 0.0


def gold_scores(texts: list[str]) -> list[float]:
    """VADER compound scores of many texts."""
    return [gold_score(t) for t in texts]
