"""Training exports its per-iteration metrics through Ray's metrics API: read back from the Prometheus endpoint."""

import math
import re
import time
import urllib.request

import pytest
import ray

import cluster.train
from cluster.config import load_config
from cluster.run_log import read_metrics
from cluster.telemetry import metric_name
from envs.data import write_prompts

PROMPTS = ["the film was great", "I hated this movie", "a wonderful story", "the ending was boring"]
CHECKED = ("iteration", "episodes", "tokens", "rm_score", "gold_score", "kl_ref", "policy_loss", "entropy")


def gauge_values(text: str) -> dict[str, float]:
    """``ray_alignray_train_*`` series of one scrape -> {name: value} (without the ``ray_`` prefix)."""
    pattern = r"^ray_(alignray_train_[a-z0-9_]+)(?:\{[^}]*\})? (\S+)$"
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.M)}


def test_each_iteration_reaches_the_prometheus_endpoint(tmp_path, monkeypatch):
    published = []
    real = cluster.train.publish_training_metrics
    monkeypatch.setattr(cluster.train, "publish_training_metrics", lambda m: (published.append(dict(m)), real(m)))
    prompts = write_prompts(tmp_path / "prompts.parquet", PROMPTS, ["train"] * len(PROMPTS))
    cfg = load_config("tiny", [f"data.prompts={prompts}", f"run.output_dir={tmp_path / 'run'}", "ppo.iterations=2"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, _system_config={"metrics_report_interval_ms": 1000})
    try:
        cluster.train.train(cfg)  # joins the Ray started here and leaves it running
        rows = read_metrics(tmp_path / "run" / "metrics.csv")
        assert [m["iteration"] for m in published] == [r["iteration"] for r in rows] == [1, 2]
        last = rows[-1]
        port = ray.nodes()[0]["MetricsExportPort"]
        deadline, values = time.time() + 30, {}
        while time.time() < deadline:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            values = gauge_values(text)
            if values.get(metric_name("iteration")) == 2:
                break
            time.sleep(0.5)
        for key in CHECKED:
            assert math.isfinite(last[key]), key
            assert values.get(metric_name(key)) == pytest.approx(last[key], rel=1e-5, abs=1e-9), key
        nan = [k for k, v in last.items() if isinstance(v, float) and math.isnan(v)]
        assert all(metric_name(k) not in values for k in nan)  # NaN columns are not exported
    finally:
        ray.shutdown()
