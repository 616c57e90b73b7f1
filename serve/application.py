"""Composing the Serve application: the policy deployment, with the reward deployment bound to it as a handle."""

from __future__ import annotations

from typing import Any

from envs.models import ModelSettings
from envs.reward_model import RewardModel, RewardModelSettings
from serve.app import PolicyServer
from serve.rewards import RewardScorer
from serve.settings import ServeSettings


def deployment_options(s: ServeSettings) -> dict[str, Any]:
    """Replica count or autoscaling, resources and concurrency of the policy deployment."""
    opts: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica},
    }
    if s.min_replicas == s.max_replicas:
        opts["num_replicas"] = s.min_replicas
    else:
        opts["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s,
            "downscale_delay_s": s.downscale_delay_s,
            "look_back_period_s": s.look_back_period_s,
            # Deprecated in Serve 2.60 but still what sets how often the load is reported.
            "metrics_interval_s": s.autoscaling_metrics_interval_s,
        }
    return opts


def build_application(
    model: ModelSettings,
    name: str,
    settings: ServeSettings,
    api_key: str = "",
    reward_model: str | None = None,
    torch_threads: int = 0,
):
    """The Serve application for a policy (``model.policy`` is a spec or an HF directory), optionally with a reward model directory."""
    reward, reward_name = None, None
    if reward_model:
        path = RewardModel.check_dir(reward_model)
        reward_name = path.name
        reward = RewardScorer.options(
            ray_actor_options={"num_cpus": settings.num_cpus_per_replica, "num_gpus": 0}
        ).bind(RewardModelSettings(path=str(path)), wait_s=settings.batch_wait_timeout_s, torch_threads=torch_threads)
    policy = PolicyServer.options(**deployment_options(settings))
    return policy.bind(model, name, settings, api_key, reward, reward_name, torch_threads)
