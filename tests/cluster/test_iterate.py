"""`alignray iterate` on the tiny preset: two rounds whose labels come from simulated annotators over HTTP,
and a run killed (SIGKILL) in the middle of labelling that continues without losing a label."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from sqlalchemy import func, select

from cluster.config import load_config
from cluster.iterate import _label_criteria, _overall_init, iterate
from envs.data import write_preferences
from envs.reward_model import RewardModel, RewardModelSettings
from serve.labelling.reports import export_rows
from serve.labelling.schema import annotators, submissions
from serve.labelling.store import LabelStore

ALIGNRAY = Path(sys.executable).parent / "alignray"
ITEMS = 12


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _overrides(tmp_path: Path) -> list[str]:
    return [
        f"run.output_dir={tmp_path / 'run'}",
        f"serve.port={_free_port()}",
        "serve.num_cpus_per_replica=0",
        f"feedback.round_items={ITEMS}",
        "feedback.batch_size=6",
        "feedback.simulated_annotators=2",
        f"reward_model.path={tmp_path / 'no-reward-model'}",  # round 1 starts from a fresh head
        "ppo.iterations=1",
    ]


def test_two_rounds_with_simulated_annotators_over_http(tmp_path):
    cfg = load_config("tiny", _overrides(tmp_path))
    result = iterate(cfg, rounds=2, annotator="simulated")
    run = tmp_path / "run"
    one, two = result["rounds"]
    assert (one["labels_round"], two["labels_round"], two["labels_total"]) == (ITEMS, ITEMS, 2 * ITEMS)
    assert one["rm_warm_start"] is None and two["rm_warm_start"] == str(run / "round_1" / "reward_model")
    assert two["policy_in"] == str(run / "round_1" / "ppo" / "policy")  # round 2 samples from round 1's policy
    assert one["rm_train_pairs"] == ITEMS and two["rm_train_pairs"] == 2 * ITEMS  # every label so far
    # one head per labelled criterion, 'overall' (what PPO optimises) first
    rm_meta = json.loads((run / "round_2" / "reward_model" / "alignray_reward.json").read_text())
    assert rm_meta["criteria"][0] == "overall" and sorted(rm_meta["criteria"][1:]) == sorted(cfg.feedback.criteria)
    assert one["rm_prev_on_new_labels"] is None and 0.0 <= two["rm_prev_on_new_labels"] <= 1.0
    assert (run / "round_2" / "ppo" / "policy" / "config.json").exists()
    assert one["gold_reference"] == two["gold_reference"]  # one evaluation seed: the same reference samples
    report = Path(result["report"]).read_text()
    assert report.count("\n| 1 |") == 1 and report.count("\n| 2 |") == 1
    assert json.loads((run / "iterate.json").read_text()) == {"round": 3, "step": "labels"}
    store = LabelStore(f"sqlite:///{run / 'labels.db'}")
    rows = export_rows(store)
    store.close()
    assert {r["annotator"] for r in rows} == {"sim-0", "sim-1"}  # labels came through the app as the annotators
    assert {r["policy"] for r in rows} == {"tiny", str(run / "round_1" / "ppo" / "policy")}
    assert len({(r["annotator"], r["item_id"], r["criterion"]) for r in rows}) == len(rows)


def _labels(db: Path) -> tuple[int, int]:
    """(labels, largest number of labels one annotator gave one item)."""
    if not db.exists():
        return 0, 0
    store = LabelStore(f"sqlite:///{db}")
    with store.engine.connect() as c:
        n = c.execute(select(func.count()).select_from(submissions)).scalar()
        per = c.execute(
            select(func.count()).select_from(submissions).group_by(submissions.c.annotator_id, submissions.c.item_id)
        ).scalars()
        worst = max(per, default=0)
        names = set(c.execute(select(annotators.c.name)).scalars())
    store.close()
    assert names <= {"sim-0", "sim-1"}
    return n, worst


def test_a_killed_run_continues_where_it_stopped_without_losing_labels(tmp_path):
    args = [str(ALIGNRAY), "iterate", "tiny", *_overrides(tmp_path), "feedback.round_items=40", "feedback.batch_size=4"]
    args += ["--rounds", "1", "--annotator", "simulated"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    db = tmp_path / "run" / "labels.db"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while _labels(db)[0] < 6:
            assert proc.poll() is None and time.time() < deadline, "iterate ended or stalled before labelling"
            time.sleep(0.05)
    finally:  # the whole tree: the CLI, its Ray, the app's replica
        try:
            family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    state = tmp_path / "run" / "iterate.json"
    assert _labels(db)[0] < 40 and not state.exists()  # killed in round 1's labelling step
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    labels, worst = _labels(db)
    assert labels == 40 and worst == 1  # every item labelled once: nothing lost, nothing twice
    assert json.loads((tmp_path / "run" / "iterate.json").read_text()) == {"round": 2, "step": "labels"}


def test_a_round_trains_the_labelled_criteria_overall_first(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "criterion": c, "tie": tie}
        for c, tie in [("safety", False), ("overall", False), ("quality", True), ("consistency", False)]
    ]
    path = write_preferences(tmp_path / "labels.parquet", rows)
    assert _label_criteria(str(path)) == ["overall", "safety", "consistency"]  # quality: only a tie


def test_round_one_continues_a_default_head_that_is_not_overall(tmp_path):
    settings = RewardModelSettings(backbone="tiny", max_length=32, criteria=["positivity", "consistency"])
    src = RewardModel.untrained(settings).save(tmp_path / "rm")
    init = _overall_init(src, tmp_path / "init")
    rm, before = RewardModel.load(init), RewardModel.load(src)
    assert rm.criteria == ["overall", "positivity", "consistency"]
    texts = ["a fine film", "dull"]
    assert rm.score(texts) == before.score(texts, criterion="positivity")  # the same head under the labels' name
    assert _overall_init(init, tmp_path / "again") == init  # a model with an 'overall' head is used as it is
