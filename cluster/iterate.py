"""``alignray iterate``: rounds of RLHF whose labels come through the labelling app.

Round k (policy 1 is ``model.policy``, policy k+1 is round k's PPO policy):

1. ``labels``: the app (Serve, ``/label`` on ``serve.host:serve.port``) generates
   ``feedback.round_items`` candidate pairs from policy k through the policy deployment, and
   annotators label them: people (``--annotator human``: the command prints the links and waits,
   showing progress) or ``feedback.simulated_annotators`` simulated Bradley-Terry VADER
   annotators that go through the app's HTTP API exactly as the page does;
2. ``reward_model``: every label so far is exported (``round_k/preferences.parquet``) and the
   reward model trained on it, one head per labelled criterion with ``overall`` first (the head
   PPO optimises), warm-started from round k-1's (round 1: from ``reward_model.path`` when a
   trained model is there; if its default head is not ``overall``, e.g. the demo's
   ``positivity``, that head is where ``overall`` starts, as ``round_1/reward_model_init``);
3. ``ppo``: PPO from policy k against that reward model (``round_k/ppo``; KL to policy k);
4. ``eval``: policy k+1 against the original ``model.policy`` on held-out prompts (gold score,
   KL, reward-model score), and the reward model's agreement with the gold order on the held-out
   pairs of ``data.preferences``.

``<run.output_dir>/iterate.json`` records the round and step reached. A killed run started
again continues there: labels are in the store (``<run.output_dir>/labels.db``), each annotator
gets back the item it held, and PPO resumes from its latest checkpoint. ``report.md`` compares
the rounds.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from cluster.config import Config, ConfigError
from cluster.evaluate import evaluate
from cluster.iterate_report import round_summary, write_rounds_report
from cluster.labelling import APP_NAME, admin_key_for, db_url, open_store, start_label_app
from cluster.report import write_report
from cluster.serving import check_port
from cluster.train import train
from envs.data import DEFAULT_CRITERION, criterion_of, load_preferences, resolve_path
from envs.models import ModelLoadError
from envs.reward_model import RewardModel
from envs.reward_training import train_reward_model
from serve.labelling.application import delete_label_app
from serve.labelling.client import LabelClient
from serve.labelling.reports import export
from serve.labelling.simulated import SimulatedAnnotator

STEPS = ("labels", "reward_model", "ppo", "eval")
STATE_FILE = "iterate.json"
REFERENCE_CACHE = "reference_samples.json"


def _paths(out: Path, k: int) -> dict[str, Path]:
    r = out / f"round_{k}"
    return {"dir": r, "prefs": r / "preferences.parquet", "rm": r / "reward_model", "ppo": r / "ppo"}


def _state(out: Path) -> dict:
    path = out / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {"round": 1, "step": STEPS[0]}


def _save_state(out: Path, state: dict) -> None:
    """Atomic: a kill leaves the old state or the new one."""
    tmp = out / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, out / STATE_FILE)


def _round_config(cfg: Config, out: Path, k: int) -> Config:
    """The config of round k's training: policy k, round k's reward model, labels and output."""
    p = _paths(out, k)
    policy = cfg.model.policy if k == 1 else str(_paths(out, k - 1)["ppo"] / "policy")
    return cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"policy": policy}),
            "reward_model": cfg.reward_model.model_copy(update={"path": str(p["rm"])}),
            "data": cfg.data.model_copy(update={"preferences": str(p["prefs"])}),
            "run": cfg.run.model_copy(update={"output_dir": str(p["ppo"]), "seed": cfg.run.seed + k - 1}),
        }
    )


def _round_done(store, k: int, items: int) -> bool:
    counts = store.slot_counts(k)
    return store.round_items(k) >= items and counts["open"] == 0 and counts["claimed"] == 0


def _simulate(cfg: Config, url: str, store, k: int) -> None:
    """Simulated annotators label round k over HTTP until it is complete."""
    f = cfg.feedback
    for attempt in range(5):  # a batch of empty or identical responses adds no item: ask again
        sims = [
            SimulatedAnnotator(
                LabelClient(url, store.invite(f"sim-{i}")),
                f.criteria,
                f.simulated_tau,
                seed=cfg.run.seed * 7919 + k * 97 + i + attempt,
            )
            for i in range(f.simulated_annotators)
        ]
        threads = [threading.Thread(target=s.run, kwargs={"wait_s": 1.0}, daemon=True) for s in sims]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in sims:
            s.client.close()
        if _round_done(store, k, f.round_items):
            return
    raise RuntimeError(f"round {k}: the policy keeps writing pairs with an empty or identical response")


def _wait_for_people(cfg: Config, url: str, key: str, store, k: int) -> None:
    """Print the links and progress until people have labelled round k."""
    print(f"alignray: round {k}: labelling app at {url}/  (admin: {url}/admin#t={key})", flush=True)
    print("alignray: invite annotators with `alignray label invite NAME` (same config)", flush=True)
    last = None
    while not _round_done(store, k, cfg.feedback.round_items):
        counts = store.slot_counts(k)
        line = f"round {k}: {counts['done']} labelled, {counts['claimed']} in progress, {counts['open']} open"
        if line != last:
            print(f"alignray: {line}", flush=True)
            last = line
        time.sleep(5)


def _labels(cfg: Config, out: Path, k: int, annotator: str, key: str) -> None:
    policy = _round_config(cfg, out, k).model.policy
    url = start_label_app(cfg, key, policy, None, round_=k, max_items=cfg.feedback.round_items)
    store = open_store(cfg)
    try:
        if annotator == "simulated":
            _simulate(cfg, url, store, k)
        else:
            _wait_for_people(cfg, url, key, store, k)
    finally:
        store.close()
        delete_label_app(APP_NAME)  # frees the policy replica before PPO


def _label_criteria(path: str) -> list[str]:
    """The heads a round trains: 'overall' first (the reward PPO optimises), then every other labelled criterion.

    A criterion nobody gave an order on (only ties, "both bad" or skipped) has nothing to train
    and is left out; 'overall' always stays (training says so clearly if it has no pair).
    """
    ordered = [criterion_of(r) for r in load_preferences(path, None) if not r.get("tie", False)]
    return [DEFAULT_CRITERION] + [c for c in dict.fromkeys(ordered) if c != DEFAULT_CRITERION]


def _overall_init(src: Path, dst: Path) -> Path:
    """`src` with an 'overall' head where its default head is not one: a copy of that head, first.

    The labels' overall verdict is what PPO optimises, as the default head of a model trained
    on other data (e.g. the demo's 'positivity') was: round 1 continues it instead of starting a
    fresh head from a handful of labels.
    """
    rm = RewardModel.load(src)
    if DEFAULT_CRITERION in rm.heads:
        return src
    first = rm.criteria[0]
    rm.add_heads([DEFAULT_CRITERION], prompt_heads=[DEFAULT_CRITERION] if first in rm.prompt_heads else [])
    rm.heads[DEFAULT_CRITERION].load_state_dict(rm.heads[first].state_dict())
    rm.stats[DEFAULT_CRITERION] = rm.stats[first]
    rm.order_heads([DEFAULT_CRITERION])
    shutil.rmtree(dst, ignore_errors=True)
    return rm.save(dst)


def _reward_model(cfg: Config, out: Path, k: int) -> None:
    import torch

    rc = _round_config(cfg, out, k)
    store = open_store(cfg)
    try:
        export(store, rc.data.preferences, rounds=list(range(1, k + 1)))
    finally:
        store.close()
    warm = str(_paths(out, k - 1)["rm"]) if k > 1 else cfg.reward_model.path
    try:
        warm = RewardModel.check_dir(resolve_path(warm))
    except ModelLoadError:
        warm = None  # round 1 without a trained reward model: fresh heads
    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    if warm is not None and k == 1:
        warm = _overall_init(warm, _paths(out, 1)["dir"] / "reward_model_init")
    # The preset's criteria name heads of its own preference data; a round's heads are the labels' criteria.
    settings = rc.reward_model.model_copy(update={"criteria": _label_criteria(rc.data.preferences)})
    shutil.rmtree(settings.path, ignore_errors=True)
    train_reward_model(settings, rc.data.preferences, rc.run.seed, warm_start=str(warm) if warm else None)


def _eval(cfg: Config, out: Path, k: int) -> None:
    rc = _round_config(cfg, out, k)
    # Every round is evaluated with the run's own seed: the same held-out prompts and sampling seed, so the
    # reference's samples are the same each round (drawn once, kept in REFERENCE_CACHE, re-scored by each
    # round's reward model) and the rounds' policies differ by what they learnt alone.
    run = rc.run.model_copy(update={"seed": cfg.run.seed})
    ev = cfg.model_copy(update={"reward_model": rc.reward_model, "run": run})
    evaluate(
        ev, str(rc.run.output_dir), out_dir=Path(rc.run.output_dir) / "eval", reference_cache=out / REFERENCE_CACHE
    )
    write_report(rc.run.output_dir)
    store = open_store(cfg)
    try:
        prev = _paths(out, k - 1)["rm"] if k > 1 else None
        summary = round_summary(
            cfg, store, k, Path(rc.run.output_dir), Path(rc.reward_model.path), rc.model.policy, prev
        )
    finally:
        store.close()
    (_paths(out, k)["dir"] / "summary.json").write_text(json.dumps(summary, indent=2))


def _fresh(cfg: Config, out: Path) -> None:
    if cfg.feedback.db_url:
        raise ConfigError("feedback.db_url: --fresh only clears the default SQLite store; drop the database yourself")
    for path in [out / STATE_FILE, *out.glob("round_*"), *out.glob("labels.db*"), *out.glob(REFERENCE_CACHE)]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def iterate(cfg: Config, rounds: int, annotator: str = "simulated", fresh: bool = False) -> dict:
    """Run (or continue) `rounds` rounds; returns {'report': path, 'rounds': [summaries]}."""
    import ray

    if rounds < 1:
        raise ConfigError(f"--rounds: must be >= 1, got {rounds}")
    if annotator == "simulated" and cfg.feedback.simulated_annotators < cfg.feedback.overlap:
        raise ConfigError("feedback.simulated_annotators: must be >= feedback.overlap, or items can never fill")
    out = resolve_path(cfg.run.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        _fresh(cfg, out)
    state = _state(out)
    if state["round"] > rounds:
        print(f"alignray: {rounds} rounds already done in {out}")
    own = not ray.is_initialized()
    if own:
        if not os.environ.get("RAY_ADDRESS"):
            check_port(cfg.serve.host, cfg.serve.port)
        ray.init(address="local" if not os.environ.get("RAY_ADDRESS") else None, include_dashboard=False)
    key = admin_key_for(cfg)
    print(f"alignray: label store {db_url(cfg)}", flush=True)
    try:
        steps = {
            "labels": lambda k: _labels(cfg, out, k, annotator, key),
            "reward_model": lambda k: _reward_model(cfg, out, k),
        }
        steps |= {"ppo": lambda k: train(_round_config(cfg, out, k), resume=True), "eval": lambda k: _eval(cfg, out, k)}
        while state["round"] <= rounds:
            k, step = state["round"], state["step"]
            print(f"\n=== round {k}/{rounds}: {step} ===", flush=True)
            steps[step](k)
            i = STEPS.index(step) + 1
            state = {"round": k + (i == len(STEPS)), "step": STEPS[i % len(STEPS)]}
            _save_state(out, state)
    finally:
        if own:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    report, summaries = write_rounds_report(out, rounds)
    return {"report": str(report), "rounds": summaries}
