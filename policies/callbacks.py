"""EnvRunner callback: per-response metrics (reward-model score, gold score, length, EOS, reward).

Each finished response adds to per-iteration sums (RLlib's ``reduce="sum"`` restarts every
iteration); the train loop divides by ``count``. Results land under
``result["env_runners"]["response"]``.
"""

from __future__ import annotations

from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.utils.annotations import override

RESPONSE_METRICS = ("count", "rm_score", "gold", "length", "eos", "reward")


def response_values(info: dict) -> dict[str, float] | None:
    """The metric values of one finished response from its last-step `info` (None if it did not end)."""
    if not info.get("response_done"):
        return None
    parts = info.get("reward_parts", {})
    return {"count": 1.0, "rm_score": float(parts.get("reward_model", float("nan"))),
            "gold": float(parts.get("gold", float("nan"))), "length": float(info["response_tokens"]),
            "eos": float(info["eos"]), "reward": float(info["reward"])}


class ResponseMetrics(RLlibCallback):
    """Log one finished response's metrics into the EnvRunner's metrics."""

    @override(RLlibCallback)
    def on_episode_end(self, *, episode, metrics_logger=None, **kwargs) -> None:
        values = response_values(episode.get_infos(-1))
        if values is None or metrics_logger is None:
            return
        for name, value in values.items():
            if value == value:  # skip NaN (e.g. no reward model configured)
                metrics_logger.log_value(("response", name), value, reduce="sum")
        if values["rm_score"] == values["rm_score"]:
            metrics_logger.log_value(("response", "rm_count"), 1.0, reduce="sum")
