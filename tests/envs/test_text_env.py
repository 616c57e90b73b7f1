"""The text-generation env: Gymnasium's checker, seeding, episode end, rewards, batched vector scoring."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs import ENV_ID
from envs.data import DataSettings, write_prompts
from envs.models import ModelSettings
from envs.text_env import EnvSettings, TextGenerationEnv
from envs.text_vector_env import make_text_env

PROMPTS = ["the film was great", "I hated this movie", "the plot was bad", "a wonderful story", "the acting"]


@pytest.fixture
def prompts(tmp_path):
    return str(write_prompts(tmp_path / "prompts.parquet", PROMPTS, ["train"] * 4 + ["test"]))


def kwargs(prompts, **extra):
    settings = EnvSettings(max_new_tokens=4, max_prompt_tokens=12, instruction="", reward={"gold": 1.0, "length": 0.5})
    return {
        "settings": settings.model_copy(update=extra),
        "data": DataSettings(prompts=prompts),
        "model": ModelSettings(policy="tiny", tiny_vocab_size=64),
    }


def rollout(env, seed, actions):
    obs, _ = env.reset(seed=seed)
    out = [obs["input_ids"].tolist()]
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        out.append((obs["input_ids"].tolist(), r, term, trunc))
        if term or trunc:
            obs, _ = env.reset()
            out.append(obs["input_ids"].tolist())
    return out


def test_registered_and_passes_check_env(prompts):
    env = gym.make(ENV_ID, **kwargs(prompts))
    check_env(env.unwrapped, skip_render_check=True)
    assert isinstance(env.unwrapped, TextGenerationEnv)
    assert env.action_space == gym.spaces.Discrete(64)


def test_same_seed_same_episodes(prompts):
    actions = [10, 11, 12, 13, 14, 3, 20, 21]
    a = rollout(TextGenerationEnv(**kwargs(prompts)), 7, actions)
    b = rollout(TextGenerationEnv(**kwargs(prompts)), 7, actions)
    c = rollout(TextGenerationEnv(**kwargs(prompts)), 8, actions)
    assert a == b
    assert a != c


def test_split_and_prompt_format(prompts):
    env = TextGenerationEnv(**kwargs(prompts))
    tok = env.res.tokenizer
    seen = {tuple(env.reset(seed=s)[0]["input_ids"]) for s in range(20)}
    texts = {tok.decode([i for i in ids if i != env.pad_id]) for ids in seen}
    assert len(seen) == 4  # the held-out 'test' prompt never shows up
    assert all(t.startswith("<|user|>") and t.endswith("<|assistant|>") for t in texts)  # chat template


def test_eos_terminates_and_budget_truncates(prompts):
    env = TextGenerationEnv(**kwargs(prompts, reward={"eos": 1.0}, no_eos_penalty=-2.0))
    obs, _ = env.reset(seed=0)
    n0 = int(obs["length"])
    obs, r, term, trunc, info = env.step(10)
    assert (r, term, trunc, int(obs["length"])) == (0.0, False, False, n0 + 1)
    obs, r, term, trunc, info = env.step(env.eos_id)
    assert term and not trunc and r == 1.0 and info["eos"] and info["response_tokens"] == 2
    assert info["reward_parts"]["eos"] == 1.0 and "gold" in info["reward_parts"]
    env.reset()
    for _ in range(3):
        assert env.step(10)[2:4] == (False, False)
    _, r, term, trunc, info = env.step(11)
    assert trunc and not term and r == -2.0 and not info["eos"]  # eos part 0, no-EOS penalty -2


def test_inject_tokens_extends_context_not_budget(prompts):
    env = TextGenerationEnv(**kwargs(prompts))
    obs, _ = env.reset(seed=0)
    n0 = int(obs["length"])
    obs = env.inject([7, 8])
    assert int(obs["length"]) == n0 + 2 and env.response_tokens == 0


def test_vector_env_batches_reward_calls_and_autoresets(prompts):
    venv = make_text_env({**kwargs(prompts), "num_envs": 3})
    calls = []
    fn = venv.res.reward_fn
    venv.res.reward_fn = lambda batch: calls.append(len(batch.responses)) or fn(batch)
    obs, _ = venv.reset(seed=0)
    assert obs["input_ids"].shape == (3, 16)
    for _ in range(3):
        obs, r, term, trunc, infos = venv.step(np.array([10, 10, 10]))
    obs, r, term, trunc, infos = venv.step(np.array([10, 10, 10]))
    assert trunc.all() and calls == [3]  # all three scored in one call
    assert infos["_reward_parts"].all() and r[0] == pytest.approx(infos["reward"][0])
    obs, r, term, trunc, infos = venv.step(np.array([10, 10, 10]))  # NEXT_STEP autoreset: fresh prompts
    assert not (term | trunc).any() and (r == 0).all() and infos["_prompt_index"].all()


def test_vector_env_matches_single_env_episodes(prompts):
    venv = make_text_env({**kwargs(prompts), "num_envs": 1})
    single = TextGenerationEnv(**kwargs(prompts))
    vobs, _ = venv.reset(seed=3)
    sobs, _ = single.reset(seed=3)
    for step in range(10):
        np.testing.assert_array_equal(vobs["input_ids"][0], sobs["input_ids"])
        a = 10 + step % 5
        vobs, vr, vt, vtr, _ = venv.step(np.array([a]))
        sobs, sr, st, str_, _ = single.step(a)
        assert (vr[0], vt[0], vtr[0]) == pytest.approx((sr, st, str_))
        if st or str_:
            sobs, _ = single.reset()
            vobs, *_ = venv.step(np.array([0]))


def test_data_position_round_trip(prompts):
    venv = make_text_env({**kwargs(prompts), "num_envs": 2})
    venv.reset(seed=5)
    for _ in range(8):
        venv.step(np.array([10, 10]))
    pos = venv.get_data_position()
    nxt = [venv.res.stream.next() for _ in range(3)]
    other = make_text_env({**kwargs(prompts), "num_envs": 2})
    other.set_shard(0, 1)  # an EnvRunner pins the stream: its seeded resets must not move it
    other.set_data_position(pos)
    other.reset(seed=99)
    assert [e._index for e in other.envs] == nxt[:2]


def finish_all(venv, steps=40):
    """Step with a non-EOS token until nothing is left to finish; return the infos of finished responses."""
    done = []
    for _ in range(steps):
        _, r, term, trunc, infos = venv.step(np.full(venv.num_envs, 10))
        done += [
            {k: infos[k][i] for k in ("response_tokens", "group", "prompt_index")} for i in np.flatnonzero(term | trunc)
        ]
    return done


def test_a_quota_hands_out_exactly_that_many_whole_responses_then_parks(prompts):
    venv = make_text_env({**kwargs(prompts), "num_envs": 3})
    venv.set_quota(5)  # slots serve 2, 2 and 1 responses
    venv.reset(seed=0)
    done = finish_all(venv)
    assert len(done) == 5 and all(d["response_tokens"] == 4 for d in done)
    assert venv.res.stream.position == 5  # no prompt drawn for a response nobody will train on
    obs, r, term, trunc, _ = venv.step(np.full(3, 10))
    assert venv._parked.all() and (obs["length"] == 1).all() and not (r.any() or term.any() or trunc.any())


def test_group_slots_answer_the_same_prompt(prompts):
    venv = make_text_env({**kwargs(prompts), "num_envs": 4, "group_size": 2})
    venv.set_quota(8)  # 2 groups x 2 rounds x 2 slots
    venv.reset(seed=0)
    done = finish_all(venv)
    groups: dict = {}
    for d in done:
        groups.setdefault(d["group"], []).append(d["prompt_index"])
    assert len(groups) == 4 and all(len(v) == 2 and v[0] == v[1] for v in groups.values())
    assert venv.res.stream.position == 4  # one prompt per group
    with pytest.raises(ValueError, match="whole groups"):
        venv.set_quota(3)


def test_two_runners_split_a_pass_of_the_prompts():
    from envs.prompt_stream import PromptStream

    a, b = PromptStream(10, seed=3, shard=0, shards=2), PromptStream(10, seed=3, shard=1, shards=2)
    first, second = [a.next() for _ in range(5)], [b.next() for _ in range(5)]
    assert sorted(first + second) == list(range(10))  # disjoint, and together one whole pass
    whole = PromptStream(10, seed=3)
    assert [whole.next() for _ in range(10)] == [x for pair in zip(first, second) for x in pair]


def test_make_with_no_arguments_gives_a_working_env_on_the_shipped_prompts():
    import subprocess
    import sys

    # A fresh interpreter: `import envs` alone must register the id, without loading any model.
    code = "import envs, gymnasium as gym, sys; assert envs.ENV_ID in gym.registry; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    env = gym.make(ENV_ID)
    check_env(env.unwrapped, skip_render_check=True)
    obs, info = env.reset(seed=0)
    assert info["prompt_index"] >= 0 and len(env.unwrapped.res.prompts) == 1250  # the shipped train split
    assert env.action_space.n == 49152  # the embedded SmolLM2's vocabulary
    for _ in range(env.unwrapped.res.settings.max_new_tokens):
        obs, reward, term, trunc, info = env.step(env.unwrapped.res.tokenizer.encode(" great")[0])
    assert trunc and info["reward_parts"]["gold"] == pytest.approx(reward) and reward > 0.5
    assert set(info["reward_parts"]) == {"gold", "gold.positivity", "gold.consistency"}  # every gold criterion


def test_the_docstring_example_runs():
    import doctest

    import envs.text_env

    result = doctest.testmod(envs.text_env)
    assert result.attempted >= 5 and result.failed == 0


def test_a_part_of_one_reward_model_head_loads_the_reward_model(prompts, tmp_path):
    from envs.reward_model import RewardModelSettings

    # A constraint on one head with no weight (as ppo.constraints adds it) still needs the reward model.
    rm = RewardModelSettings(backbone="tiny", path=str(tmp_path / "none"), criteria=["positivity", "consistency"])
    env = TextGenerationEnv(**kwargs(prompts, reward={"gold": 1.0, "reward_model.consistency": 0.0}), reward_model=rm)
    env.reset(seed=0)
    for _ in range(4):
        obs, reward, term, trunc, info = env.step(5)
    assert trunc and reward == pytest.approx(info["reward_parts"]["gold"])  # the head carries no weight
    assert {"reward_model.positivity", "reward_model.consistency"} <= set(info["reward_parts"])
