"""The estimators and LoRA end to end on tiny models: each moves a known reward; groups stay whole; LoRA trains adapters only."""

from __future__ import annotations

import pickle

import pytest
import ray
import torch
from ray.rllib.core.columns import Columns
from transformers import AutoModelForCausalLM

from cluster.config import load_config
from cluster.run_log import read_metrics
from cluster.train import latest_checkpoint, train
from envs.data import write_prompts
from envs.models import load_causal_lm
from policies.algo import build_ppo_config
from policies.learner import LMPPOLearner
from tests.policies.test_whole_responses import responses

PROMPTS = [f"the {a} was {b}" for a in ("film", "movie", "plot", "story") for b in ("great", "bad", "dull", "fun")]
EOS_TASK = {"env.reward": "{eos: 1.0}", "ppo.iterations": 10, "ppo.episodes_per_iteration": 16,
            "ppo.minibatch_episodes": 8, "ppo.epochs": 2, "ppo.lr": 0.01, "ppo.kl_coef": 0.01, "ppo.kl_target": 0}  # fmt: skip


def tiny_cfg(tmp, **over):
    prompts = write_prompts(tmp / "prompts.parquet", PROMPTS, ["train"] * len(PROMPTS))
    items = {"data.prompts": prompts, "run.output_dir": tmp / "run", **over}
    return load_config("tiny", [f"{k}={v}" for k, v in items.items()])


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_each_critic_free_estimator_learns_a_known_reward(estimator, tmp_path):
    """Reward 1 for ending with EOS; the KL in the loss (k3), as GRPO does."""
    over = {**EOS_TASK, "ppo.advantage_estimator": estimator, "ppo.group_size": 4, "ppo.kl_in": "loss",
            "ppo.kl_estimator": "k3"}  # fmt: skip
    train(tiny_cfg(tmp_path, **over))
    eos = [r["eos_rate"] for r in read_metrics(tmp_path / "run" / "metrics.csv")]
    assert sum(eos[-3:]) / 3 > sum(eos[:3]) / 3 + 0.2, eos
    state = pickle.loads(
        next(
            (tmp_path / "run" / "checkpoints").glob("*/learner_group/learner/rl_module/default_policy/module_state.pkl")
        ).read_bytes()
    )
    assert not any(k.startswith("vf_head") for k in state)  # critic-free: no value head at all


def test_groups_stay_whole_through_two_env_runners_and_the_minibatches(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, **{"ppo.advantage_estimator": "grpo", "ppo.group_size": 2, "ppo.episodes_per_iteration": 8,
                                "ppo.minibatch_episodes": 4, "ppo.epochs": 2, "rollout.num_env_runners": 2,
                                "rollout.num_cpus_per_env_runner": 0})  # fmt: skip
    seen = []
    real = LMPPOLearner.compute_loss_for_module

    def spy(self, *, module_id, config, batch, fwd_out):
        ids, lengths, mask = batch[Columns.OBS]["input_ids"], batch[Columns.OBS]["length"], batch[Columns.LOSS_MASK]
        rows = [
            (tuple(ids[i, : lengths[i]].tolist()), int(batch[Columns.ACTIONS][i])) for i in range(len(ids)) if mask[i]
        ]
        seen.append(responses(rows, cfg.env.max_new_tokens))
        return real(self, module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)

    monkeypatch.setattr(LMPPOLearner, "compute_loss_for_module", spy)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        algo = build_ppo_config(cfg, 0).build_algo()
        algo.train()
        algo.stop()
    finally:
        ray.shutdown()
    assert len(seen) == 2 * 8 // 4
    for minibatch in seen:
        prompts = [chain[0][0] for chain in minibatch]  # a response's first context is its prompt
        assert len(minibatch) == 4 and all(prompts.count(p) == 2 for p in prompts)  # two whole groups of two


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    cfg = tiny_cfg(tmp, **{"model.lora.rank": 4, "ppo.lr": 0.01, "ppo.iterations": 2})
    metrics = train(cfg)
    yield tmp, cfg, metrics


def module_state(ckpt):
    return pickle.loads(
        (ckpt / "learner_group" / "learner" / "rl_module" / "default_policy" / "module_state.pkl").read_bytes()
    )


def test_lora_trains_only_the_adapters_and_its_reference_is_the_base_model(lora_run):
    tmp, cfg, _ = lora_run
    state = module_state(latest_checkpoint(tmp / "run"))
    base, _ = load_causal_lm("tiny", tiny_vocab_size=cfg.model.tiny_vocab_size)
    for name, p in base.named_parameters():  # every base weight is exactly the initial one
        key = f"lm.base_model.model.{name.replace('.weight', '.base_layer.weight')}"
        key = key if key in state else f"lm.base_model.model.{name}"
        assert torch.equal(torch.as_tensor(state[key]), p.detach()), name
    adapters = [k for k in state if "lora_B" in k]
    assert adapters and all(torch.as_tensor(state[k]).abs().sum() > 0 for k in adapters)  # B starts at 0: they moved
    rows = read_metrics(tmp / "run" / "metrics.csv")
    assert abs(rows[0]["kl_ref"]) < 1e-6 and rows[0]["first_ratio_dev"] < 1e-6  # adapters off == the base model
    adapter_bytes = sum(torch.as_tensor(v).numel() * 4 for k, v in state.items() if "lora_" in k)
    assert rows[-1]["weight_sync_bytes"] == adapter_bytes  # EnvRunners receive the adapters and nothing else


def test_lora_reference_pass_equals_the_base_model_to_the_digit(lora_run):
    from tests.fixtures.modules import tiny_module

    tmp, cfg, _ = lora_run
    m = tiny_module(12, model=cfg.model.model_copy(update={"tiny_vocab_size": 64}))
    m.set_state(module_state(latest_checkpoint(tmp / "run")))
    base, _ = load_causal_lm("tiny", tiny_vocab_size=64)
    ids = torch.zeros(1, 12, dtype=torch.long)
    ids[0, :4] = torch.tensor([6, 7, 8, 9])
    batch = {Columns.OBS: {"input_ids": ids, "length": torch.tensor([4])}, Columns.ACTIONS: torch.tensor([10])}
    logp, _ = m.reference_pass(batch)
    with torch.no_grad():
        want = torch.log_softmax(base(input_ids=ids[:, :4]).logits[0, -1], -1)[10]
    assert float(logp[0]) == float(want)  # bit for bit: the same weights, the same kernels
    assert float(m.forward_train(batch)["logp"][0]) != float(want)  # while the policy itself has moved


def test_lora_export_merges_and_the_adapter_loads_back(lora_run):
    tmp, _, metrics = lora_run
    merged = AutoModelForCausalLM.from_pretrained(metrics["policy_dir"])
    assert not any("lora" in n for n, _ in merged.named_parameters())
    from peft import PeftModel

    # The adapter names its base ('tiny' here, whose vocabulary the run set to 64): peft loads it on that base.
    base, _ = load_causal_lm("tiny", tiny_vocab_size=64)
    from_adapter = PeftModel.from_pretrained(base, str(tmp / "run" / "policy-adapter")).merge_and_unload()
    ids = torch.tensor([[6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, from_adapter(input_ids=ids).logits)


def adam_steps(ckpt) -> dict[str, float]:
    """Steps taken by each of the learner's optimizers."""
    state = pickle.loads((ckpt / "learner_group" / "learner" / "state.pkl").read_bytes())
    return {
        name: max(float(s["step"]) for s in opt["state"]["state"].values()) for name, opt in state["optimizer"].items()
    }


def test_lora_resume_restores_the_adapters_and_the_optimizer(lora_run):
    tmp, cfg, _ = lora_run
    before = adam_steps(latest_checkpoint(tmp / "run"))
    adapters = {k: v for k, v in module_state(latest_checkpoint(tmp / "run")).items() if "lora_" in k}
    resumed = train(tiny_cfg(tmp, **{"model.lora.rank": 4, "ppo.lr": 0.01, "ppo.iterations": 3}), resume=True)
    assert resumed["iteration"] == 3
    after = adam_steps(latest_checkpoint(tmp / "run"))
    assert after.keys() == before.keys() and all(after[k] > before[k] for k in before)  # Adam kept counting
    # Fresh adapters (B = 0) would sample exactly the reference (KL 0): the restored ones do not.
    assert abs(read_metrics(tmp / "run" / "metrics.csv")[2]["kl_ref"]) > 1e-4
    moved = module_state(latest_checkpoint(tmp / "run"))
    assert all(
        not torch.equal(torch.as_tensor(moved[k]), torch.as_tensor(v)) for k, v in adapters.items() if "lora_B" in k
    )


CONSTRAINED = {**EOS_TASK, "ppo.iterations": 18, "ppo.constraints": "{length: 0.6}", "ppo.multiplier_lr": 2.0,
               "ppo.multiplier_kp": 0.0, "ppo.multiplier_init": 0.0, "ppo.constraint_window": 32,
               "run.checkpoint_every": 6}  # fmt: skip


def test_a_constraint_becomes_active_then_satisfied_and_resume_keeps_its_multiplier(tmp_path):
    """Objective: end with EOS (short answers); constraint: E[length / budget] >= 0.6 (long answers).

    The plain update (kp 0, starting at 0), so that the multiplier moves with the sign of the violation,
    stepped from the mean over the last two iterations (32 responses); the PI law and the window are
    checked by hand in tests/policies.
    """
    train(tiny_cfg(tmp_path, **CONSTRAINED))
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    value, lam = [r["constraint.length"] for r in rows], [r["multiplier.length"] for r in rows]
    violated = [i for i, v in enumerate(value) if v < 0.6]
    assert violated and all(lam[i] > (lam[i - 1] if i else 0.0) for i in violated if i)  # rises while violated
    later = [i for i in range(violated[0], len(rows)) if value[i] >= 0.6]
    assert later, value  # the multiplier brought the constraint back
    assert all(lam[i] < lam[i - 1] or lam[i] == 0.0 for i in later)  # and falls while satisfied
    state = pickle.loads((latest_checkpoint(tmp_path / "run") / "learner_group" / "learner" / "state.pkl").read_bytes())
    assert state["multipliers"]["length"] == pytest.approx(lam[-1])
    assert state["multiplier_integrals"]["length"] == pytest.approx(lam[-1])  # kp = 0: lambda is the integral
    train(tiny_cfg(tmp_path, **{**CONSTRAINED, "ppo.iterations": 19}), resume=True)
    r = read_metrics(tmp_path / "run" / "metrics.csv")[-1]
    pooled = (rows[-1]["constraint_batch.length"] + r["constraint_batch.length"]) / 2  # the window came back too
    assert r["constraint.length"] == pytest.approx(pooled)
    want = max(0.0, lam[-1] + 2.0 * (0.6 - pooled))  # one step on from the saved multiplier
    assert r["multiplier.length"] == pytest.approx(want, abs=1e-6)
