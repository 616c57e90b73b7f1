"""The RLModule: what EnvRunners hold and receive, what exploration returns, cache clearing."""

import gymnasium as gym
import numpy as np
import torch
from ray.rllib.core.columns import Columns

from policies.lm_module import LMModule

W = 12


def module(inference_only=False, **config):
    obs = gym.spaces.Dict({"input_ids": gym.spaces.Box(0, 63, (W,), np.int64), "length": gym.spaces.Discrete(W + 1)})
    return LMModule(observation_space=obs, action_space=gym.spaces.Discrete(64), inference_only=inference_only,
                    model_config={"policy": "tiny", "tiny_vocab_size": 64, **config})


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
    m = module(inference_only=True, temperature=0.7, top_k=5)
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


def test_values_without_embeddings_hold_no_graph():
    m = module()
    with torch.no_grad():
        m.vf_head.weight.fill_(0.1)
    batch = obs_batch()
    v = m.compute_values(batch)
    assert v.shape == (2,)
    assert v.grad_fn is not None  # only through the (tiny) head ...
    assert all(p.grad is None for p in m.lm.parameters())
    v.sum().backward()
    assert all(p.grad is None for p in m.lm.parameters())  # ... the LM pass ran without a graph
