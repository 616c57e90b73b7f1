"""Learner peak memory: full fine-tuning against LoRA, one demo-sized PPO update each, in separate processes.

What is measured (CPU, Linux): the learner's resident-set growth. Episodes are sampled once, in their own
process, and pickled; each measured process then loads them and builds the env (tokenizer, spaces), reads
its RSS (the baseline), builds the Learner from a preset (policy + reference or adapters, value head,
optimizer) and runs ``updates`` PPO updates on the episodes with the preset's minibatches. The peak is the
kernel's high-water mark of the process (``ru_maxrss``); learner peak = peak - baseline. PyTorch keeps no
allocator peak on the CPU, so RSS is what there is; it includes the glibc heap the learner touched.

glibc keeps freed blocks below its mmap threshold in its heap, and that threshold grows (to 32 MB) as
large blocks are freed, so activations of a few MB each end up in a heap that fragments and whose
high-water mark stays resident: RSS then reports what the allocator hoarded, not what the tensors needed.
``--malloc-mmap-threshold 262144`` fixes the threshold (glibc's ``MALLOC_MMAP_THRESHOLD_``) in each measured
process, so every block of 256 KB or more is mapped on allocation and returned on free: the peak is then
close to the live tensors' peak, which is what a GPU allocator's ``max_memory_allocated`` reports, at the
cost of page faults (slower updates). Several values run every variant once per value.

    python bench/lora_memory.py                      # SmolLM2: demo and lora presets, each without and with
                                                     # gradient checkpointing, 32 episodes x 24 tokens
    python bench/lora_memory.py --malloc-mmap-threshold 0 262144   # glibc's default, then blocks returned
    python bench/lora_memory.py --model tiny --episodes 16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cluster.config import load_config


def rss_mb() -> float:
    """Current resident set size of this process (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def peak_mb() -> float:
    """High-water mark of this process's resident set (MB; Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def preset(name: str, args) -> object:
    """A variant 'PRESET[:KEY=VALUE,...]' sized for the measurement."""
    # The rewards do not matter to memory: a length reward keeps the reward model out of every process.
    name, _, extra = name.partition(":")
    return load_config(
        name,
        [
            *filter(None, extra.split(",")),
            f"model.policy={args.model}",
            f"env.max_new_tokens={args.max_new_tokens}",
            "env.reward={length: 1.0}",
            f"ppo.episodes_per_iteration={args.episodes}",
            f"rollout.num_envs_per_env_runner={args.episodes}",
        ],
    )


def sample(args) -> None:
    from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner

    from policies.algo import build_ppo_config

    cfg = preset("demo", args)
    runner = SingleAgentEnvRunner(config=build_ppo_config(cfg, cfg.run.seed))
    episodes = runner.sample(num_episodes=args.episodes, explore=True)
    runner.stop()
    Path(args.file).write_bytes(pickle.dumps(episodes))


def measure(args) -> None:
    from envs.text_vector_env import make_text_env
    from policies.algo import build_ppo_config, env_config

    torch.set_num_threads(args.threads)
    cfg = preset(args.measure, args)
    episodes = pickle.loads(Path(args.file).read_bytes())
    env = make_text_env({**env_config(cfg, cfg.run.seed), "num_envs": 1})
    config = build_ppo_config(cfg, cfg.run.seed)
    base = rss_mb()
    learner = config.build_learner(env=env)
    built = rss_mb()
    trainable = sum(
        p.numel() for p in learner.module[next(iter(learner.module.keys()))].parameters() if p.requires_grad
    )
    times = []
    for _ in range(args.updates):
        t0 = time.perf_counter()
        learner.update(episodes=copy.deepcopy(episodes), num_epochs=1, minibatch_size=config.minibatch_size)
        times.append(time.perf_counter() - t0)
    peak = peak_mb()
    print(
        json.dumps(
            {
                "preset": args.measure,
                "malloc_mmap_threshold": int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 0)),
                "lora_rank": cfg.model.lora.rank,
                "trainable_params": trainable,
                "baseline_rss_mb": round(base, 1),
                "after_build_rss_mb": round(built, 1),
                "process_peak_rss_mb": round(peak, 1),
                "learner_build_mb": round(built - base, 1),
                "learner_peak_mb": round(peak - base, 1),
                "update_s": [round(t, 2) for t in times],
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--updates", type=int, default=2, help="PPO updates per process (the first allocates Adam's state)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--presets",
        nargs="+",
        default=["demo", "lora", "lora:model.gradient_checkpointing=true", "demo:model.gradient_checkpointing=true"],
        help="variants PRESET[:KEY=VALUE,...]; the first is the baseline of the ratios",
    )
    ap.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        nargs="+",
        default=[0],
        help="glibc mmap threshold of the measured processes, bytes (0 = glibc's default, dynamic)",
    )
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--sample", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sample:
        return sample(args)
    if args.measure:
        return measure(args)
    common = [
        f"--model={args.model}",
        f"--episodes={args.episodes}",
        f"--max-new-tokens={args.max_new_tokens}",
        f"--updates={args.updates}",
        f"--threads={args.threads}",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        file = str(Path(tmp) / "episodes.pkl")
        subprocess.run([sys.executable, __file__, "--sample", f"--file={file}", *common], check=True)
        for threshold in args.malloc_mmap_threshold:
            env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
            if threshold:
                env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
            for name in args.presets:
                out = subprocess.run(
                    [sys.executable, __file__, f"--measure={name}", f"--file={file}", *common],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=env,
                ).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    for threshold in args.malloc_mmap_threshold:
        mode = f"malloc mmap threshold {threshold} B" if threshold else "glibc default"
        group = [r for r in rows if r["malloc_mmap_threshold"] == threshold]
        base = group[0]
        for r in group:
            r["ratio"] = round(r["learner_peak_mb"] / base["learner_peak_mb"], 3)
            print(
                f"[{mode}] {r['preset']}: learner peak {r['learner_peak_mb']:.0f} MB = {r['ratio']:.2f}x "
                f"{base['preset']}'s {base['learner_peak_mb']:.0f} MB, update {min(r['update_s']):.1f} s"
            )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
