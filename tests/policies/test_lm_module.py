"""The RLModule: what EnvRunners hold and receive, what exploration returns, cache clearing."""

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
