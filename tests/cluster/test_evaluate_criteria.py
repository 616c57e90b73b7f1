"""Evaluation per criterion on tiny models: a score column per reward-model head and per gold criterion."""

import json

import pyarrow.parquet as pq
import pytest

from cluster.config import load_config
from cluster.evaluate import evaluate, format_summary
from cluster.report import write_report
from envs import tiny
from envs.data import write_prompts
from envs.gold import gold_criteria
from envs.models import export_pretrained


def test_per_criterion_columns_and_summary(tmp_path):
    prompts = write_prompts(
        tmp_path / "prompts.parquet", ["the film was", "I hated this movie", "a movie"], ["test"] * 3
    )
    cfg = load_config(
        None,
        [
            "model.policy=tiny",
            "reward_model.backbone=tiny",
            f"reward_model.path={tmp_path / 'no_rm'}",  # untrained tiny heads for these criteria
            "reward_model.criteria=[positivity, consistency]",
            f"data.prompts={prompts}",
            "run.eval_prompts=3",
            "env.max_new_tokens=5",
        ],
    )
    model, tok = tiny.causal_lm()
    export_pretrained(model, tok, tmp_path / "policy")
    summary = evaluate(cfg, str(tmp_path / "policy"), out_dir=tmp_path / "eval")
    rows = pq.read_table(tmp_path / "eval" / "samples.parquet").to_pylist()
    per = {"rm_score.positivity", "rm_score.consistency", "gold_score.positivity", "gold_score.consistency"}
    assert per <= set(rows[0])
    for r in rows:
        assert r["rm_score"] == r["rm_score.positivity"]  # rm_score stays the first head
        gold = gold_criteria([r["prompt"]], [r["response"]])
        assert r["gold_score"] == r["gold_score.positivity"] == gold["positivity"][0]
        assert r["gold_score.consistency"] == pytest.approx(gold["consistency"][0])
    saved = json.loads((tmp_path / "eval" / "summary.json").read_text())
    for side in ("reference_metrics", "policy_metrics"):
        assert per | {"gold_score_sem.consistency", "gold_score_sem"} <= set(saved[side])
    ref = [r for r in rows if r["model"] == "reference"]
    mean = sum(r["gold_score.consistency"] for r in ref) / len(ref)
    assert saved["reference_metrics"]["gold_score.consistency"] == pytest.approx(mean)
    assert saved["gold_gain.consistency"] == 0.0 and saved["gold_gain"] == 0.0  # the policy is the reference
    assert "rm_score.consistency" in format_summary(summary)
    report = write_report(tmp_path).read_text()  # tmp_path/eval is this run's evaluation
    assert "| gold_score.consistency |" in report and "- gold gain, consistency: +0.000" in report
