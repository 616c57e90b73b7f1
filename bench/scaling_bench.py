"""Scaling benchmark: rollout tokens/s with 1, 2 and 4 remote EnvRunners on this machine.

Each EnvRunner is an RLlib ``SingleAgentEnvRunner`` actor built by our PPO config (the LM module
with its prefix KV cache, ``num_envs_per_env_runner`` sequences generated together, 1 CPU, so
Ray gives it one torch thread). A round asks every EnvRunner, in parallel, for
``envs_per_runner * max_new_tokens`` generated tokens and times the slowest: aggregate
tokens/s = all tokens / wall time. One warm-up round per setting, then the median of
``--rounds``. The reward is VADER ('gold'): no reward model to train, cheap to score.

Ray runs in this process on a private temp dir with 4 logical CPUs (so 4 EnvRunners can be
placed on a 2-core machine: the 4-runner row measures oversubscription).

    python bench/scaling_bench.py                      # SmolLM2-135M, 1/2/4 EnvRunners (~5 min on 2 cores)
    python bench/scaling_bench.py --model tiny         # the random tiny model: Ray/RLlib overhead only
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time


def tokens_of(runner, steps: int) -> int:
    """On an EnvRunner: sample `steps` env steps; the generated tokens it returned."""
    return sum(len(e) for e in runner.sample(num_timesteps=steps, explore=True))


def measure(cfg, n: int, rounds: int) -> dict[str, float]:
    """Build PPO with `n` EnvRunners; aggregate rollout tokens/s over `rounds` timed rounds."""
    from policies.algo import build_ppo_config

    t0 = time.perf_counter()
    algo = build_ppo_config(cfg, cfg.run.seed).build_algo()
    build_s = time.perf_counter() - t0
    steps = cfg.rollout.num_envs_per_env_runner * cfg.env.max_new_tokens
    group = algo.env_runner_group
    try:
        group.foreach_env_runner(lambda r: tokens_of(r, steps), local_env_runner=False)  # warm-up
        rates = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            tokens = sum(group.foreach_env_runner(lambda r: tokens_of(r, steps), local_env_runner=False))
            rates.append(tokens / (time.perf_counter() - t0))
    finally:
        algo.stop()
    return {"runners": n, "tok_s": statistics.median(rates), "best": max(rates), "build_s": build_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or 'tiny'")
    ap.add_argument("--runners", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--envs-per-runner", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=4, help="logical CPUs Ray may hand out")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="arb-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp  # a private Ray: never joins or disturbs another local cluster
    import ray

    from cluster.config import load_config

    overrides = [
        f"model.policy={args.model}", f"env.max_new_tokens={args.max_new_tokens}", "env.reward={gold: 1.0}",
        f"rollout.num_envs_per_env_runner={args.envs_per_runner}", "rollout.num_cpus_per_env_runner=1",
        "ppo.episodes_per_iteration=64", "ppo.minibatch_episodes=16",
    ]  # fmt: skip
    if args.model == "tiny":
        overrides += ["model.tiny_vocab_size=512", "reward_model.backbone=tiny"]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    try:
        print(
            f"model={args.model} envs/runner={args.envs_per_runner} max_new_tokens={args.max_new_tokens} "
            f"rounds={args.rounds} cores={os.cpu_count()} ({platform.processor() or platform.machine()})"
        )
        print("| EnvRunners | rollout tok/s (median) | best | speed-up | build s |\n|---|---|---|---|---|")
        base = None
        for n in args.runners:
            cfg = load_config("demo", overrides + [f"rollout.num_env_runners={n}"])
            row = measure(cfg, n, args.rounds)
            base = base or row["tok_s"]
            print(
                f"| {n} | {row['tok_s']:.0f} | {row['best']:.0f} | {row['tok_s'] / base:.2f}x | {row['build_s']:.0f} |",
                flush=True,
            )
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
