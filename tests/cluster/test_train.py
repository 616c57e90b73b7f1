"""End to end on the tiny model: 2 PPO iterations, checkpoint -> resume, export -> load back."""

import json
import math
import pickle
import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from cluster.config import load_config
from cluster.run_log import read_metrics
from cluster.train import STATE_FILE, latest_checkpoint, train
from envs.data import write_prompts
from envs.models import load_causal_lm

PROMPTS = [
    "the film was great",
    "I hated this movie",
    "the plot was bad",
    "a wonderful story",
    "the acting was terrible",
    "I loved the music",
    "the ending was boring",
    "a fun movie",
]


def tiny_cfg(tmp, **over):
    prompts = write_prompts(tmp / "prompts.parquet", PROMPTS, ["train"] * len(PROMPTS))
    items = {"data.prompts": prompts, "run.output_dir": tmp / "run", **over}
    return load_config("tiny", [f"{k}={v}" for k, v in items.items()])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppo")
    t0 = time.time()
    metrics = train(tiny_cfg(tmp))
    yield tmp, metrics, time.time() - t0
    if ray.is_initialized():
        ray.shutdown()


def module_state(ckpt):
    path = ckpt / "learner_group" / "learner" / "rl_module" / "default_policy" / "module_state.pkl"
    return pickle.loads(path.read_bytes())


def test_two_iterations_change_every_parameter_and_stay_finite(run):
    tmp, metrics, seconds = run
    assert seconds < 60
    assert metrics["iteration"] == 2 and not ray.is_initialized()  # train() stops the Ray it started
    rows = read_metrics(tmp / "run" / "metrics.csv")
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("policy_loss", "vf_loss", "entropy", "kl_ref", "kl_coef", "rm_score", "gold_score", "ratio_max"):
            assert math.isfinite(r[k]), k
        assert r["episodes"] > 0 and r["rollout_tokens_per_s"] > 0 and r["learner_tokens_per_s"] > 0
        # Each iteration's own sampling and learning times (not running means over earlier ones) fit in its time.
        assert r["tokens"] / r["rollout_tokens_per_s"] + r["tokens"] / r["learner_tokens_per_s"] <= r["time_s"] + 1e-3
    initial, _ = load_causal_lm("tiny", tiny_vocab_size=64)
    state = module_state(latest_checkpoint(tmp / "run"))
    unchanged = [n for n, p in initial.named_parameters() if torch.equal(p, torch.as_tensor(state[f"lm.{n}"]))]
    assert unchanged == []
    assert torch.as_tensor(state["vf_head.weight"]).abs().sum() > 0  # the value head (zero-initialised) learned


def test_resume_continues_from_saved_iteration(run):
    tmp, metrics, _ = run
    ckpt = latest_checkpoint(tmp / "run")
    saved_coef = pickle.loads((ckpt / "learner_group" / "learner" / "state.pkl").read_bytes())["kl_controller"]["coef"]
    assert saved_coef == pytest.approx(metrics["kl_coef"])
    resumed = train(tiny_cfg(tmp, **{"ppo.iterations": 3}), resume=True)
    assert resumed["iteration"] == 3
    rows = read_metrics(tmp / "run" / "metrics.csv")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert rows[2]["kl_coef_used"] == pytest.approx(saved_coef)  # not the initial 0.05
    positions = [
        json.loads((tmp / "run" / "checkpoints" / f"iter_00000{i}" / STATE_FILE).read_text())["data_positions"][0][
            "position"
        ]
        for i in (2, 3)
    ]
    assert positions[1] > positions[0]  # the prompt stream went on from where it was
    assert sorted(p.name for p in (tmp / "run" / "checkpoints").iterdir()) == ["iter_000002", "iter_000003"]  # keep 2
    assert not ray.is_initialized()


def test_export_loads_back(run):
    tmp, metrics, _ = run
    model = AutoModelForCausalLM.from_pretrained(metrics["policy_dir"])
    state = module_state(latest_checkpoint(tmp / "run"))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, torch.as_tensor(state[f"lm.{n}"]))


def test_checkpoint_converts_to_hf(run, tmp_path):
    from policies.export import checkpoint_to_hf

    tmp, metrics, _ = run
    out = checkpoint_to_hf(tmp / "run", tmp_path / "hf")  # a run directory: its latest checkpoint
    a = AutoModelForCausalLM.from_pretrained(out)
    b = AutoModelForCausalLM.from_pretrained(metrics["policy_dir"])
    for (_n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q)


def test_shared_reward_model_actor_scores_for_the_env_runners(tmp_path):
    """placement=actor: the driver's reward-model actor scored every response, and is gone afterwards."""
    metrics = train(tiny_cfg(tmp_path, **{"rollout.reward_model_placement": "actor", "rollout.num_env_runners": 1}))
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["rm_score"]) for r in rows)
    scored = metrics["reward_actor"]
    # every response of every iteration, whole and once, except empty ones (those score env.empty_response_score)
    assert scored["texts"] == round(sum(r["episodes"] * (1 - r["empty_rate"]) for r in rows)) > 0
    assert 1 <= scored["batches"] <= scored["calls"]
    assert not ray.is_initialized()


def test_reward_actor_options_come_from_the_config(tmp_path, monkeypatch):
    import cluster.train as train_module

    seen = {}
    monkeypatch.setattr(train_module, "start_reward_actor", lambda *args, **kw: seen.update(kw, args=args))
    assert train_module._start_reward_actor(tiny_cfg(tmp_path)) is None  # placement 'local': no actor
    cfg = tiny_cfg(
        tmp_path,
        **{
            "rollout.reward_model_placement": "actor",
            "rollout.reward_model_num_gpus": 0.5,
            "rollout.reward_model_resources": "{rm: 1}",
        },
    )
    train_module._start_reward_actor(cfg)
    assert seen["num_gpus"] == 0.5 and seen["resources"] == {"rm": 1.0} and seen["args"][0].backbone == "tiny"


def test_a_known_reward_is_learned(tmp_path):
    """The 'eos' reward (1 for a response that ends with EOS): the tiny policy learns to stop."""
    over = {
        "env.reward": "{eos: 1.0}",
        "ppo.iterations": 8,
        "ppo.episodes_per_iteration": 16,
        "ppo.minibatch_episodes": 8,
        "ppo.epochs": 2,
        "ppo.lr": 0.01,
        "ppo.kl_coef": 0.01,
        "ppo.kl_target": 0,
    }
    train(tiny_cfg(tmp_path, **over))
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    first, last = rows[0], rows[-1]
    assert first["eos_rate"] < 0.25 and last["eos_rate"] > 0.6, [r["eos_rate"] for r in rows]
    assert last["response_length"] < first["response_length"] - 1
    assert all(r["first_ratio_dev"] < 1e-6 for r in rows)  # every iteration starts on-policy


def test_the_same_seed_gives_the_same_run_twice(tmp_path):
    """Everything but wall-clock timings repeats to the digit: sampling, rewards, losses, KL, controller."""
    timing = {"rollout_tokens_per_s", "learner_tokens_per_s", "time_s"}
    runs = []
    for name in ("first", "again"):
        (tmp_path / name).mkdir()
        train(tiny_cfg(tmp_path / name))
        runs.append(read_metrics(tmp_path / name / "run" / "metrics.csv"))
    first, again = runs
    assert len(first) == len(again) == 2
    for a, b in zip(first, again):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
