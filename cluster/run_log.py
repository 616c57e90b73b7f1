"""Per-iteration training metrics: picked out of an RLlib result, written to CSV and TensorBoard."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

METRICS = (
    "iteration", "rm_score", "gold_score", "reward", "kl_ref", "kl_ref_k3", "kl_target", "kl_coef", "kl_coef_used",
    "entropy", "response_length", "length_min", "length_max", "eos_rate", "truncated_rate", "empty_rate", "episodes",
    "tokens", "rollout_tokens_per_s", "learner_tokens_per_s", "policy_loss", "vf_loss", "vf_explained_var",
    "approx_kl", "clipfrac", "ratio_mean", "ratio_max", "ratio_dev", "first_approx_kl", "first_clipfrac",
    "first_ratio_dev", "weight_sync_bytes", "time_s",
)  # fmt: skip
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
    count = resp.get("count")
    out = {"iteration": int(result["training_iteration"])}
    out |= {k: _num(learner.get(k)) for k in METRICS if k in LEARNER_METRICS}
    out |= {
        "rm_score": _ratio(resp.get("rm_score"), resp.get("rm_count")),
        "gold_score": _ratio(resp.get("gold"), count),
        "reward": _ratio(resp.get("reward"), count),
        "response_length": _ratio(resp.get("length"), count),
        "length_min": _num(resp.get("length_min")),
        "length_max": _num(resp.get("length_max")),
        "eos_rate": _ratio(resp.get("eos"), count),
        "truncated_rate": 1.0 - _ratio(resp.get("eos"), count),  # responses that used the whole token budget
        "empty_rate": _ratio(resp.get("empty", 0.0), count),
        "episodes": _num(count or 0),
        "tokens": _num(resp.get("length", 0)),
        "rollout_tokens_per_s": _ratio(resp.get("length"), timers.get("env_runner_sampling_timer")),
        "learner_tokens_per_s": _ratio(resp.get("length"), timers.get("learner_update_timer")),
        "weight_sync_bytes": _num(runners.get("weight_sync_bytes")),
        "time_s": _num(result.get("time_this_iter_s")),
    }
    # Per criterion (reward-model heads, gold criteria) and per constraint: columns named after them.
    out |= {name: _ratio(total, count) for name, total in runners.get("parts", {}).items()}
    out |= {k: _num(v) for k, v in learner.items() if k.startswith(("multiplier.", "constraint.", "constraint_batch."))}
    return out


LEARNER_METRICS = {
    "kl_ref", "kl_ref_k3", "kl_target", "kl_coef", "kl_coef_used", "entropy", "policy_loss", "vf_loss",
    "vf_explained_var", "approx_kl", "clipfrac", "ratio_mean", "ratio_max", "ratio_dev", "first_approx_kl",
    "first_clipfrac", "first_ratio_dev",
}  # fmt: skip
"""Columns read as is from the Learner's results (means over minibatches, or the first minibatch's)."""


class RunLog:
    """Appends iteration rows to ``<dir>/metrics.csv`` and scalars to TensorBoard under ``<dir>/tb``."""

    def __init__(self, out_dir: str | Path, resume_from: int | None = None):
        self.path = Path(out_dir) / "metrics.csv"
        rows = read_metrics(self.path) if resume_from is not None and self.path.exists() else []
        self.rows = [r for r in rows if r["iteration"] <= (resume_from or 0)]  # drop rows past the checkpoint
        self.columns = list(self.rows[0]) if self.rows else list(METRICS)
        self._rewrite()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=(resume_from or 0) + 1)

    def _rewrite(self) -> None:
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

    def write(self, metrics: dict[str, float]) -> None:
        """Add one iteration (the run's per-criterion columns come after the fixed ones)."""
        self.rows.append(metrics)
        extra = [k for k in metrics if k not in self.columns]
        if extra:
            self.columns += sorted(extra)
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(metrics)
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
