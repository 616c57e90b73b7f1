"""Reward-model training on a labelling export (criteria, ties, both bad) and from a warm start."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from envs.data import DataError, write_preferences
from envs.reward_model import RewardModelSettings
from envs.reward_training import train_reward_model

GOOD = ["great fun", "wonderful acting", "loved the story", "the best film"]
BAD = ["terrible plot", "awful acting", "hated the ending", "the worst film"]


def _export_rows(n: int) -> list[dict]:
    """Rows shaped like `alignray label export`: per item an overall row, a safety row, and some ties."""
    rows = []
    for i in range(n):
        base = {
            "prompt": "the film",
            "annotator": "sim-0",
            "item_id": f"r1-{i}",
            "created_at": datetime(2026, 11, 30, tzinfo=UTC),
            "policy": "tiny",
            "comment": "",
            "both_bad": False,
        }
        pair = {"chosen": GOOD[i % 4], "rejected": BAD[(i + 1) % 4], "tie": False}
        rows.append({**base, **pair, "criterion": "overall"})
        rows.append({**base, **pair, "criterion": "safety", "chosen": BAD[0], "rejected": GOOD[0]})
        if i % 3 == 0:  # ties and both-bad rows carry no order: the trainer must skip them
            tie = {"chosen": BAD[i % 4], "rejected": GOOD[i % 4], "tie": True}
            rows.append({**base, **tie, "item_id": f"r1-{i}-t", "criterion": "overall", "both_bad": i % 2 == 0})
    return rows


def _settings(tmp_path, name: str) -> RewardModelSettings:
    return RewardModelSettings(
        backbone="tiny", max_length=32, path=str(tmp_path / name), epochs=4, batch_size=8, lr=1e-3
    )


def test_trains_on_an_export_with_ties_and_warm_starts(tmp_path):
    data = write_preferences(tmp_path / "export.parquet", _export_rows(30))
    first = train_reward_model(_settings(tmp_path, "rm1"), data)
    assert first["train_pairs"] == 30  # overall rows only, the 10 ties / both-bad rows skipped
    assert first["eval_accuracy"] == 1.0  # safety rows (the reverse order) were not trained on
    assert first["warm_start"] is None

    second = train_reward_model(_settings(tmp_path, "rm2"), data, warm_start=tmp_path / "rm1")
    assert second["warm_start"] == str(tmp_path / "rm1")
    # Before its first step the warm-started model already orders the pairs as the first one left them.
    assert second["untrained_accuracy"] == 1.0
    assert first["untrained_accuracy"] < 1.0


def test_an_export_of_only_ties_is_a_clear_error(tmp_path):
    rows = [r for r in _export_rows(6) if r["tie"]]
    data = write_preferences(tmp_path / "ties.parquet", rows)
    with pytest.raises(DataError, match="no 'overall' preference pairs"):
        train_reward_model(_settings(tmp_path, "rm"), data)
