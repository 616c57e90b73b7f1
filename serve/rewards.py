"""The reward-model deployment behind ``POST /v1/rewards``: the same batching server training uses.

:class:`~envs.reward_actor.RewardModelServer` gathers the ``score`` calls of concurrent requests
into one forward pass; here it runs as a Serve deployment that the policy deployment calls
through a handle, with Serve's replica health check on its ``check_health``.
"""

from __future__ import annotations

from ray import serve

from envs.reward_actor import RewardModelServer

RewardScorer = serve.deployment(
    RewardModelServer, name="RewardScorer", max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30
)
