"""RLlib callbacks: per-response metrics, and prompt positions that survive an EnvRunner restart.

:class:`ResponseMetrics` (on the EnvRunners): each finished response adds to per-iteration sums
(RLlib's ``reduce="sum"`` restarts every iteration); the train loop divides by ``count``.
Results land under ``result["env_runners"]["response"]``, and the sum of every reward part (each
reward-model head, each gold criterion) under ``result["env_runners"]["parts"]``.

:class:`DataPositions` (on the driver): after each iteration it records every EnvRunner's
prompt-stream position; when RLlib recreates a crashed EnvRunner it gives it back its last
position, so its prompts continue instead of starting over at position 0. (An EnvRunner that Ray
restarted without RLlib noticing shows up as a stream that went backwards and is moved on too.)
"""

from __future__ import annotations

from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.utils.annotations import override

from envs.text_env import ResponseInfo


def response_values(info: ResponseInfo | dict) -> dict[str, float] | None:
    """The metric values of one finished response from its last-step `info` (None if it did not end)."""
    if not info.get("response_done"):
        return None
    parts = info.get("reward_parts", {})
    return {
        "count": 1.0,
        "rm_score": float(parts.get("reward_model", float("nan"))),
        "gold": float(parts.get("gold", float("nan"))),
        "length": float(info["response_tokens"]),
        "eos": float(info["eos"]),
        "empty": float(not str(info.get("response", "")).strip()),  # nothing but EOS or special tokens
        "reward": float(info["reward"]),
    }


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
        metrics_logger.log_value(("response", "length_min"), values["length"], reduce="min")
        metrics_logger.log_value(("response", "length_max"), values["length"], reduce="max")
        for name, value in episode.get_infos(-1).get("reward_parts", {}).items():  # every criterion's RM and gold score
            metrics_logger.log_value(("parts", name), float(value), reduce="sum")


def data_positions(group) -> dict[int, dict]:
    """``{worker index: prompt-stream position}`` of every healthy EnvRunner that has an env (0 = local)."""

    def get(runner):
        env = getattr(runner, "env", None)
        return runner.worker_index or 0, (env.unwrapped.get_data_position() if env is not None else None)

    return {idx: pos for idx, pos in group.foreach_env_runner(get, local_env_runner=True) if pos is not None}


def set_data_positions(group, positions: dict[int, dict]) -> None:
    """Move the prompt stream of EnvRunner `idx` (0 = local) to ``positions[idx]``."""

    def put(runner):
        env, pos = getattr(runner, "env", None), positions.get(runner.worker_index or 0)
        if env is not None and pos is not None:
            env.unwrapped.set_data_position(pos)

    if 0 in positions and group.local_env_runner is not None:
        put(group.local_env_runner)
    remote = [idx for idx in positions if idx > 0]
    if remote:  # (an empty remote_worker_ids would mean "all of them")
        group.foreach_env_runner(put, local_env_runner=False, remote_worker_ids=remote)


class DataPositions(RLlibCallback):
    """Driver side: remember prompt positions after each iteration; restore them on recreated EnvRunners."""

    def __init__(self):
        super().__init__()
        self.positions: dict[int, dict] = {}

    @override(RLlibCallback)
    def on_train_result(self, *, algorithm, **kwargs) -> None:
        now = data_positions(algorithm.env_runner_group)
        # A stream that went backwards belongs to an EnvRunner Ray restarted between two calls, so
        # RLlib never saw it fail (and never called on_env_runners_recreated): move it on as well.
        behind = {
            idx: self.positions[idx]
            for idx, pos in now.items()
            if idx in self.positions
            and pos["seed"] == self.positions[idx]["seed"]
            and pos["position"] < self.positions[idx]["position"]
        }
        if behind:
            set_data_positions(algorithm.env_runner_group, behind)
        self.positions.update({**now, **behind})

    @override(RLlibCallback)
    def on_env_runners_recreated(
        self, *, algorithm, env_runner_group, env_runner_indices, is_evaluation, **kwargs
    ) -> None:
        lost = {idx: self.positions[idx] for idx in env_runner_indices if idx in self.positions}
        if lost and not is_evaluation:
            set_data_positions(env_runner_group, lost)
