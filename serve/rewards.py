"""The reward-model deployment behind ``POST /v1/rewards``: texts in, scores out, batched.

The policy deployment calls it through a handle with one ``(texts, prompts, normalize)`` item
per HTTP request; ``@serve.batch`` gathers the items of concurrent requests (up to
``max_batch_texts`` texts) into one :meth:`~envs.reward_model.RewardModel.score` call.
"""

from __future__ import annotations

import asyncio

import torch
from ray import serve

from envs.reward_model import RewardModel

RewardItem = tuple[list[str], list[str] | None, bool]
"""(texts, prompts or None, normalize) of one request."""


def _texts(items: list[RewardItem]) -> int:
    return sum(len(texts) for texts, _, _ in items)


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30)
class RewardScorer:
    """A trained :class:`RewardModel` directory, scored in batches."""

    def __init__(self, path: str, max_batch_texts: int = 128, batch_wait_timeout_s: float = 0.01,
                 torch_threads: int = 0):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model = RewardModel.load(path)
        self._score_batch.set_max_batch_size(max_batch_texts)
        self._score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def score(self, item: RewardItem) -> list[float]:
        """Scores of one request's texts (normalised with the training stats if asked)."""
        return await self._score_batch(item)

    @serve.batch(max_batch_size=128, batch_wait_timeout_s=0.01, batch_size_fn=_texts)
    async def _score_batch(self, items: list[RewardItem]) -> list[list[float]]:
        flat = [t for texts, prompts, _ in items for t in self.model.texts(texts, prompts)]
        raw = await asyncio.to_thread(self.model.score, flat)
        out, k = [], 0
        for texts, _, normalize in items:
            scores, k = raw[k:k + len(texts)], k + len(texts)
            if normalize:
                scores = [(s - self.model.score_mean) / self.model.score_std for s in scores]
            out.append(scores)
        return out

    async def check_health(self) -> None:
        """Fail the replica health check if the reward model returns a non-finite score."""
        score = (await asyncio.to_thread(self.model.score, ["health check"]))[0]
        if score != score or abs(score) == float("inf"):
            raise RuntimeError("reward model health check failed: non-finite score")
