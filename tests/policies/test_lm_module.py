"""The RLModule: what EnvRunners hold and receive, what exploration returns, cache clearing."""

import pytest
import torch
from ray.rllib.core.columns import Columns

from policies.lm_module import REF_HIDDEN
from tests.fixtures.modules import tiny_module

W = 12


def module(inference_only=False, **settings):
    return tiny_module(W, inference_only, **settings)


def obs_batch():
    ids = torch.zeros(2, W, dtype=torch.long)
    ids[0, :3] = torch.tensor([6, 7, 8])
    ids[1, :2] = torch.tensor([9, 10])
    return {Columns.OBS: {"input_ids": ids, "length": torch.tensor([3, 2])}}


def test_env_runner_module_has_no_value_head_or_reference():
    runner, learner = module(inference_only=True), module()
    assert not hasattr(runner, "vf_head") and not hasattr(runner, "_ref_lm")
    assert hasattr(learner, "vf_head") and hasattr(learner, "_ref_lm")
    assert not any(k.startswith("_ref_lm") for k in learner.state_dict())  # never checkpointed or synced
    synced = learner.get_state(inference_only=True)
    assert not any(k.startswith("vf_head") for k in synced)
    runner.set_state(synced)  # an EnvRunner accepts exactly what the learner sends


def test_exploration_returns_only_actions_and_logp():
    m = module(inference_only=True, temperature=0.7)
    out = m.forward_exploration(obs_batch())
    assert set(out) == {Columns.ACTIONS, Columns.ACTION_LOGP}
    assert out[Columns.ACTIONS].shape == (2,) and (out[Columns.ACTION_LOGP] <= 0).all()
    greedy = m.forward_inference(obs_batch())[Columns.ACTIONS]
    with torch.no_grad():
        want = m.lm(input_ids=torch.tensor([[6, 7, 8]])).logits[0, -1].argmax()
    assert int(greedy[0]) == int(want)


def test_set_state_clears_the_kv_cache():
    m = module(inference_only=True)
    m.forward_exploration(obs_batch())
    assert m._kv.cache is not None
    m.set_state(m.get_state())
    assert m._kv.cache is None


def test_values_read_the_frozen_reference_and_hold_no_graph():
    m = module()
    with torch.no_grad():
        m.vf_head.weight.fill_(0.1)
        m.lm.base_model.embed_tokens.weight.add_(1.0)  # the policy drifts; the critic's features must not
    batch = obs_batch()
    v = m.compute_values(batch)
    assert v.shape == (2,)
    with torch.no_grad():
        ref_last = m._ref_lm.base_model(input_ids=torch.tensor([[6, 7, 8]])).last_hidden_state[0, -1].float()
    torch.testing.assert_close(v[0], m.vf_head(ref_last)[0], rtol=1e-5, atol=1e-5)
    assert v.grad_fn is not None  # only through the (tiny) head ...
    v.sum().backward()
    assert all(p.grad is None for p in m.lm.parameters())  # ... the reference pass ran without a graph
    assert m.vf_head.weight.grad is not None
    # With the batch's cached reference features no pass runs at all.
    batch[REF_HIDDEN] = torch.zeros(2, m.vf_head.in_features)
    torch.testing.assert_close(m.compute_values(batch), m.vf_head.bias.expand(2))


def test_bfloat16_reference_gives_float32_outputs_close_to_float32():
    full, half = module(), module(reference_dtype="bfloat16")
    assert half._ref_lm.dtype == torch.bfloat16 and half.lm.dtype == torch.float32  # only the reference shrinks
    batch = {**obs_batch(), Columns.ACTIONS: torch.tensor([3, 4])}
    (lp32, _h32), (lp16, h16) = full.reference_pass(batch), half.reference_pass(batch)
    assert lp16.dtype == h16.dtype == torch.float32
    torch.testing.assert_close(lp16, lp32, atol=0.05, rtol=0)


def sample_rows(m, prompts: list[list[int]], steps: int, seed: int):
    """Sample `steps` tokens per prompt through the EnvRunner path (KV cache) -> learner-batch rows and their logp."""
    torch.manual_seed(seed)
    ctx = [list(p) for p in prompts]
    rows, actions, logps = [], [], []
    for _ in range(steps):
        ids = torch.zeros(len(ctx), W, dtype=torch.long)
        for i, c in enumerate(ctx):
            ids[i, : len(c)] = torch.tensor(c)
        out = m.forward_exploration({Columns.OBS: {"input_ids": ids, "length": torch.tensor([len(c) for c in ctx])}})
        for i, (a, lp) in enumerate(zip(out[Columns.ACTIONS].tolist(), out[Columns.ACTION_LOGP].tolist())):
            rows.append(list(ctx[i]))
            actions.append(a)
            logps.append(lp)
            ctx[i].append(a)
    order = sorted(range(len(rows)), key=lambda r: (r % len(prompts), r))  # episode by episode, as a learner batch
    ids = torch.zeros(len(rows), W, dtype=torch.long)
    for j, r in enumerate(order):
        ids[j, : len(rows[r])] = torch.tensor(rows[r])
    batch = {
        Columns.OBS: {"input_ids": ids, "length": torch.tensor([len(rows[r]) for r in order])},
        Columns.ACTIONS: torch.tensor([actions[r] for r in order]),
    }
    return batch, torch.tensor([logps[r] for r in order])


@pytest.mark.parametrize("family", ["llama", "gemma2-softcapped"])
def test_sampler_logp_equals_learner_logp_on_the_same_tokens(family, tmp_path):
    spec = "tiny"
    if family != "llama":  # a family whose forward transforms its logits (tanh soft-capping at 0.5)
        from transformers import Gemma2Config, Gemma2ForCausalLM

        from envs import tiny
        from envs.models import ModelSettings, export_pretrained

        lm, tok = tiny.causal_lm(
            64, config_class=Gemma2Config, model_class=Gemma2ForCausalLM, final_logit_softcapping=0.5, head_dim=8
        )
        spec = str(export_pretrained(lm, tok, tmp_path / "gemma2"))
    settings = {"model": ModelSettings(policy=spec, tiny_vocab_size=64)} if family != "llama" else {}
    runner, learner = module(inference_only=True, temperature=0.7, **settings), module(temperature=0.7, **settings)
    learner.set_state(runner.get_state())
    batch, sampled = sample_rows(runner, [[6, 7, 8], [9, 10], [11, 12, 13, 14]], steps=5, seed=3)
    with torch.no_grad():
        learned = learner.forward_train(batch)["logp"]
        reference, _ = learner.reference_pass(batch)
    torch.testing.assert_close(learned, sampled, atol=2e-5, rtol=0)  # the PPO ratio is 1 before any update
    torch.testing.assert_close(reference, sampled, atol=2e-5, rtol=0)  # and the KL to the reference is 0
    if family != "llama":
        assert (learner.lm(input_ids=torch.tensor([[6, 7]])).logits.abs() <= 0.5).all()  # soft-capping is real


def test_run_seed_changes_the_sampled_tokens():
    m = module(inference_only=True)
    prompts = [[6, 7, 8], [9, 10]]
    a, b = sample_rows(m, prompts, 6, seed=0)[0], sample_rows(m, prompts, 6, seed=1)[0]
    again = sample_rows(m, prompts, 6, seed=0)[0]
    assert torch.equal(a[Columns.ACTIONS], again[Columns.ACTIONS]) and not torch.equal(
        a[Columns.ACTIONS], b[Columns.ACTIONS]
    )
