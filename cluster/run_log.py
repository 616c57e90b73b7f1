"""Per-iteration training metrics: picked out of an RLlib result, written to CSV and TensorBoard."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

METRICS = (
    "iteration",
    "rm_score",
    "gold_score",
    "reward",
    "kl_ref",
    "kl_coef",
    "kl_coef_used",
    "entropy",
    "response_length",
    "eos_rate",
    "episodes",
    "rollout_tokens_per_s",
    "learner_tokens_per_s",
    "policy_loss",
    "vf_loss",
    "total_loss",
    "approx_kl",
    "clipfrac",
    "time_s",
)
"""Columns of ``metrics.csv`` (one row per iteration)."""


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _ratio(a: Any, b: Any) -> float:
    a, b = _num(a), _num(b)
    return a / b if b and not math.isnan(b) else float("nan")


def summarize(result: dict[str, Any], module_id: str = "default_policy") -> dict[str, float]:
    """The metrics we log, from one ``Algorithm.train()`` result."""
    runners, timers = result.get("env_runners", {}), result.get("timers", {})
    resp = runners.get("response", {})
    learner = result.get("learners", {}).get(module_id, {})
    return {
        "iteration": int(result["training_iteration"]),
        "rm_score": _ratio(resp.get("rm_score"), resp.get("rm_count")),
        "gold_score": _ratio(resp.get("gold"), resp.get("count")),
        "reward": _ratio(resp.get("reward"), resp.get("count")),
        "kl_ref": _num(learner.get("kl_ref")),
        "kl_coef": _num(learner.get("kl_coef")),  # after this iteration's update
        "kl_coef_used": _num(learner.get("kl_coef_used")),  # shaped this iteration's rewards
        "entropy": _num(learner.get("entropy")),
        "response_length": _ratio(resp.get("length"), resp.get("count")),
        "eos_rate": _ratio(resp.get("eos"), resp.get("count")),
        "episodes": _num(resp.get("count", 0)),
        "rollout_tokens_per_s": _ratio(runners.get("num_env_steps_sampled"), timers.get("env_runner_sampling_timer")),
        "learner_tokens_per_s": _ratio(learner.get("num_module_steps_trained"), timers.get("learner_update_timer")),
        "policy_loss": _num(learner.get("policy_loss")),
        "vf_loss": _num(learner.get("vf_loss")),
        "total_loss": _num(learner.get("total_loss")),
        "approx_kl": _num(learner.get("approx_kl")),
        "clipfrac": _num(learner.get("clipfrac")),
        "time_s": _num(result.get("time_this_iter_s")),
    }


class RunLog:
    """Appends iteration rows to ``<dir>/metrics.csv`` and scalars to TensorBoard under ``<dir>/tb``."""

    def __init__(self, out_dir: str | Path, resume_from: int | None = None):
        self.path = Path(out_dir) / "metrics.csv"
        rows = read_metrics(self.path) if resume_from is not None and self.path.exists() else []
        rows = [r for r in rows if r["iteration"] <= (resume_from or 0)]  # drop rows past the checkpoint
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRICS)
            writer.writeheader()
            writer.writerows(rows)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=(resume_from or 0) + 1)

    def write(self, metrics: dict[str, float]) -> None:
        """Append one iteration."""
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRICS).writerow({k: metrics.get(k) for k in METRICS})
        for k, v in metrics.items():
            if k != "iteration" and v == v:
                self.tb.add_scalar(f"alignray/{k}", v, metrics["iteration"])
        self.tb.flush()

    def close(self) -> None:
        """Flush and close TensorBoard."""
        self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Rows of a ``metrics.csv`` with numbers parsed."""
    with Path(path).open() as f:
        return [{k: (int(v) if k == "iteration" else _num(v)) for k, v in row.items()} for row in csv.DictReader(f)]
