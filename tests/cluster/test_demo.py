"""The whole demo on tiny models: every artifact appears (metrics, report with images, exported model)."""

import json

from transformers import AutoModelForCausalLM

from cluster.config import load_config
from cluster.demo import run_demo
from envs.data import write_preferences, write_prompts


def test_tiny_demo_writes_every_artifact(tmp_path):
    words = ["great", "awful", "good", "boring", "wonderful", "terrible", "fun", "dull"]
    prefs = [
        {
            "prompt": "the film",
            "chosen": f"{words[i % 8]} film",
            "rejected": f"{words[(i + 1) % 8]} film",
            "split": "train" if i < 24 else "test",
            "chosen_score": 0.5,
            "rejected_score": -0.5,
        }
        for i in range(32)
    ]
    pref_path = write_preferences(tmp_path / "prefs.parquet", prefs)
    prompt_path = write_prompts(
        tmp_path / "prompts.parquet",
        ["the film was", "the plot is", "a movie", "the story"],
        ["train", "train", "test", "test"],
    )
    run = tmp_path / "run"
    cfg = load_config(
        "tiny",
        [
            f"data.preferences={pref_path}",
            f"data.prompts={prompt_path}",
            f"reward_model.path={tmp_path / 'rm'}",
            f"run.output_dir={run}",
            "run.eval_prompts=2",
        ],
    )
    result = run_demo(cfg)
    assert (tmp_path / "rm" / "metrics.json").exists()
    assert (run / "metrics.csv").exists()
    assert AutoModelForCausalLM.from_pretrained(run / "policy") is not None
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["prompts"] == 2
    report = (run / "report.md").read_text()
    pngs = sorted(p.name for p in (run / "report").glob("*.png"))
    assert {"gold_score.png", "kl_ref.png", "kl_coef.png", "rm_score.png", "gold_vs_kl.png"} <= set(pngs)
    assert all(f"report/{p}" in report for p in pngs)
    assert result["report"] == str(run / "report.md")
