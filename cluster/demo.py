"""`alignray demo`: the whole pipeline, stage by stage, on the configured (default: embedded) models.

1. reward model: reuse ``reward_model.path`` if it was trained on the same data and settings,
   else train it; 2. PPO; 3. evaluation against the reference; 4. the report. Ends by saying
where the report and the exported policy are and how to serve them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cluster.config import Config, config_to_dict, dump_config
from cluster.evaluate import evaluate
from cluster.report import write_report
from cluster.train import train, train_rm
from envs.data import resolve_path
from envs.reward_training import metrics_lines

STAGES = ("reward model", "PPO", "evaluation", "report")


def _stage(i: int, name: str, start: float) -> None:
    print(f"\n=== [{i}/{len(STAGES)}] {name}  (t+{time.time() - start:.0f}s) ===", flush=True)


def _rm_is_current(cfg: Config) -> bool:
    """True if the reward model at cfg.reward_model.path was trained with today's settings and data."""
    meta = Path(cfg.reward_model.path) / "alignray_demo.json"
    return meta.exists() and json.loads(meta.read_text()) == _rm_key(cfg)


def _rm_key(cfg: Config) -> dict:
    """What the cached reward model depends on."""
    data = resolve_path(cfg.data.preferences)
    return {
        "reward_model": config_to_dict(cfg)["reward_model"],
        "preferences": str(data),
        "preferences_mtime": data.stat().st_mtime if data.exists() else None,
        "seed": cfg.run.seed,
    }


def run_demo(cfg: Config, fresh: bool = False) -> dict:
    """Run every stage and return {'report', 'policy', 'summary'}."""
    start = time.time()
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))

    _stage(1, STAGES[0], start)
    if not fresh and _rm_is_current(cfg):
        print(f"reusing the reward model in {cfg.reward_model.path} (--fresh retrains it)")
    else:
        m = train_rm(cfg)
        (Path(cfg.reward_model.path) / "alignray_demo.json").write_text(json.dumps(_rm_key(cfg)))
        print("\n".join(f"reward model, {line}" for line in metrics_lines(m)))

    _stage(2, STAGES[1], start)
    train(cfg, resume=False)

    _stage(3, STAGES[2], start)
    summary = evaluate(cfg, str(out), out_dir=out / "eval")
    print(summary["text"])

    _stage(4, STAGES[3], start)
    report = write_report(out)
    policy = out / "policy"
    print(f"\nDone in {(time.time() - start) / 60:.1f} min.")
    print(f"  report:          {report}  (plots in {out / 'report'})")
    print(f"  exported policy: {policy}  (a Hugging Face directory)")
    print(f"  serve it:        alignray serve {policy} --reward-model {cfg.reward_model.path}")
    return {"report": str(report), "policy": str(policy), "summary": summary}
