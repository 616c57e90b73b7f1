"""Learner benchmark: one PPO update through RLlib's Learner vs plain PyTorch forward+backward.

Both work on the same episodes (sampled once by an RLlib EnvRunner with the same model), packed
the same way (one causal pass per episode, the LM head only at generated-token rows):

- ``plain``: forward + cross-entropy on the generated tokens + backward (+ an Adam step).
- ``ppo step``: our Learner's loss forward + backward + optimizer step on the already
  prepared batch (what each PPO minibatch costs).
- ``ppo update``: ``Learner.update(episodes)`` for one epoch and one minibatch, including the
  learner connectors (episodes -> batch, the reference model's pass for the KL penalty, the
  values for GAE, which come from the same reference pass).

    python bench/learner_bench.py                    # SmolLM2, 8 episodes x 24 tokens
    python bench/learner_bench.py --model tiny --rounds 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from cluster.config import load_config
from policies.packing import pack_rows, packed_logits


def sample_episodes(cfg, episodes: int):
    """Episodes from an RLlib EnvRunner (complete or cut at the token budget)."""
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from policies.algo import build_ppo_config

    runner = SingleAgentEnvRunner(
        config=build_ppo_config(cfg, cfg.run.seed).env_runners(num_envs_per_env_runner=episodes)
    )
    eps = runner.sample(num_timesteps=episodes * cfg.env.max_new_tokens, explore=True)
    env = runner.env.unwrapped.envs[0]
    runner.stop()
    return eps, env


def token_rows(episodes):
    """(input_ids (N, W), lengths (N,), actions (N,)) of every generated token."""
    ids, lens, acts = [], [], []
    for e in episodes:
        obs = e.get_observations()
        ids.append(np.asarray(obs["input_ids"])[:-1])
        lens.append(np.asarray(obs["length"])[:-1])
        acts.append(np.asarray(e.get_actions()))
    return (
        torch.from_numpy(np.concatenate(ids)),
        torch.from_numpy(np.concatenate(lens)),
        torch.from_numpy(np.concatenate(acts)).long(),
    )


def plain_step(lm, opt, packing, actions, step: bool) -> float:
    """Forward + CE on generated tokens + backward (+ Adam step); seconds."""
    t0 = time.perf_counter()
    logits, _ = packed_logits(lm, packing)  # (N, V): the same packed pass and head path as the Learner's
    loss = torch.nn.functional.cross_entropy(logits, actions)
    loss.backward()
    if step:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(
        "demo",
        [
            f"model.policy={args.model}",
            f"env.max_new_tokens={args.max_new_tokens}",
            "env.reward={length: 1.0}",
            f"ppo.episodes_per_iteration={args.episodes}",
            f"ppo.minibatch_episodes={args.episodes}",
            "ppo.epochs=1",
        ],
    )
    from envs.models import load_causal_lm
    from policies.algo import build_ppo_config

    episodes, env = sample_episodes(cfg, args.episodes)
    ids, lengths, actions = token_rows(episodes)
    packing = pack_rows(ids, lengths)
    print(
        f"model={args.model} episodes={len(episodes)} tokens={len(actions)} packed sequences={len(packing.seqs)} "
        f"x {packing.seqs.shape[1]} threads={args.threads}"
    )
    learner = build_ppo_config(cfg, cfg.run.seed).build_learner(env=env)
    lm, _ = load_causal_lm(cfg.model.policy, cfg.model.dtype, cfg.model.tiny_vocab_size)
    lm.train()
    opt = torch.optim.Adam(lm.parameters(), lr=1e-7, fused=True)  # as the Learner
    plain_step(lm, opt, packing, actions, True)  # warm-up
    learner.update(episodes=copy.deepcopy(episodes), num_epochs=1, minibatch_size=None)
    plain, plain_adam, update = [], [], []
    for _ in range(args.rounds):
        plain.append(plain_step(lm, opt, packing, actions, False))
        plain_adam.append(plain_step(lm, opt, packing, actions, True))
        t0 = time.perf_counter()
        learner.update(episodes=copy.deepcopy(episodes), num_epochs=1, minibatch_size=None)
        update.append(time.perf_counter() - t0)
    # The PPO step alone, on a batch the connectors prepared once.
    batch = learner._learner_connector(
        rl_module=learner.module, batch={}, episodes=copy.deepcopy(episodes), shared_data={}, metrics=learner.metrics
    )
    steps = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        learner._update(batch)
        steps.append(time.perf_counter() - t0)
    p, pa, u, s = (statistics.median(x) for x in (plain, plain_adam, update, steps))
    print(
        f"plain fwd+bwd {p:.3f}s | plain fwd+bwd+adam {pa:.3f}s | ppo step {s:.3f}s ({s / p:.2f}x plain, "
        f"{s / pa:.2f}x plain+adam) | ppo update incl. the reference pass (KL + values) {u:.3f}s "
        f"({u / p:.2f}x plain, {u / pa:.2f}x plain+adam)"
    )


if __name__ == "__main__":
    main()
