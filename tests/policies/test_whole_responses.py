"""Checked on the batch the learner actually sees: whole responses, every token `epochs` times, ratio 1 first.

A tiny algorithm samples in the driver (no Ray actors); a spy on the learner's loss records the rows
of every minibatch, and a spy on the env records which prompt each response answered.
"""

from __future__ import annotations

import pytest
import ray
from ray.rllib.core.columns import Columns

from cluster.config import load_config
from cluster.run_log import summarize
from envs.data import write_prompts
from policies.algo import build_ppo_config
from policies.learner import LMPPOLearner

PROMPTS = [f"the film was {w}" for w in ("great", "bad", "dull", "fun", "good", "awful", "boring", "wonderful")] * 2


def tiny(tmp_path, *overrides):
    prompts = write_prompts(tmp_path / "p.parquet", PROMPTS, ["train"] * len(PROMPTS))
    return load_config(
        "tiny", [f"data.prompts={prompts}", f"run.output_dir={tmp_path}", "env.reward={length: 1.0}", *overrides]
    )


def responses(rows: list[tuple], budget: int, eos: int = 3) -> list[list[tuple]]:
    """Chain rows into responses (a row continues another when its context is that row's context plus its token)."""
    nxt = {ctx + (a,): (ctx, a) for ctx, a in rows}
    follows = {ctx for ctx, _ in rows if ctx in nxt}
    chains = []
    for ctx, a in rows:
        if ctx in follows:
            continue
        chain = [(ctx, a)]
        while chain[-1][0] + (chain[-1][1],) in {c for c, _ in rows}:
            c = chain[-1][0] + (chain[-1][1],)
            chain.append((c, next(b for cc, b in rows if cc == c)))
        assert chain[-1][1] == eos or len(chain) == budget, "a response was cut"
        chains.append(chain)
    assert sum(map(len, chains)) == len(rows)
    return chains


@pytest.fixture
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_each_token_is_trained_exactly_epochs_times_in_minibatches_of_whole_responses(tmp_path, monkeypatch, local_ray):
    cfg = tiny(
        tmp_path,
        "ppo.episodes_per_iteration=12",
        "ppo.minibatch_episodes=4",
        "ppo.epochs=3",
        "rollout.num_envs_per_env_runner=5",
    )  # 12 responses over 5 slots: slots serve 3, 3, 2, 2, 2
    seen: list[list[tuple]] = []
    real_loss = LMPPOLearner.compute_loss_for_module

    def spy(self, *, module_id, config, batch, fwd_out):
        ids, lengths = batch[Columns.OBS]["input_ids"], batch[Columns.OBS]["length"]
        mask = batch[Columns.LOSS_MASK].bool()
        seen.append(
            [(tuple(ids[i, : lengths[i]].tolist()), int(batch[Columns.ACTIONS][i])) for i in range(len(ids)) if mask[i]]
        )
        return real_loss(self, module_id=module_id, config=config, batch=batch, fwd_out=fwd_out)

    monkeypatch.setattr(LMPPOLearner, "compute_loss_for_module", spy)
    algo = build_ppo_config(cfg, 0).build_algo()
    try:
        metrics = summarize(algo.train())
    finally:
        algo.stop()
    assert len(seen) == 3 * 12 // 4  # epochs x responses / minibatch_episodes steps
    rows = [row for minibatch in seen for row in minibatch]
    counts: dict[tuple, int] = {}
    for row in rows:
        counts[row] = counts.get(row, 0) + 1
    assert set(counts.values()) == {3}  # every (context, token) exactly `epochs` times, none twice per epoch
    assert len(counts) == metrics["tokens"]  # and nothing but this iteration's tokens
    for minibatch in seen:  # whole responses: 4 of them per minibatch, each from its prompt to its end
        assert len(responses(minibatch, cfg.env.max_new_tokens)) == 4
    assert metrics["episodes"] == 12 and metrics["first_ratio_dev"] < 1e-6 and metrics["first_approx_kl"] < 1e-9
    assert abs(metrics["kl_ref"]) < 1e-4  # the float32 reference is the policy before the first update


def test_two_env_runners_split_a_pass_of_the_prompts_and_the_seed_moves_the_tokens(tmp_path, local_ray):
    def sampled(seed: int, runners: int) -> list[list[tuple]]:
        cfg = tiny(tmp_path, f"rollout.num_env_runners={runners}", "rollout.num_cpus_per_env_runner=0")
        algo = build_ppo_config(cfg, seed).build_algo()
        try:
            group = algo.env_runner_group

            def draw(runner):
                return [
                    (e.get_infos(-1)["prompt_index"], tuple(e.get_actions())) for e in runner.sample(num_episodes=8)
                ]

            return group.foreach_env_runner(draw, local_env_runner=runners == 0)
        finally:
            algo.stop()

    first, second = sampled(0, 2)
    prompts = [p for p, _ in first] + [p for p, _ in second]
    assert sorted(prompts) == list(range(16))  # disjoint: together exactly one pass over the 16 prompts
    (a,), (again,), (b,) = sampled(0, 0), sampled(0, 0), sampled(1, 0)
    assert a == again  # the same run.seed samples the same tokens ...
    assert [t for _, t in a] != [t for _, t in b]  # ... and another one other tokens (tiny models included)
