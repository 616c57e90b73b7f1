"""Rollout benchmark: tokens/s of RLlib EnvRunner sampling vs plain ``transformers`` ``generate``.

Same model, batch size (vector-env slots = generate rows), prompts (chat-formatted, from the
prompt dataset), sampling settings (temperature 1, no top-k/top-p) and token budget. The
EnvRunner is training's own (:class:`policies.env_runner.ResponseEnvRunner` built from our PPO
config) asked for one whole response per slot, as an iteration does, sampling through the LM
module's prefix KV cache; ``generate`` writes one response per row with its own KV cache. Both
count the tokens of the responses (up to and including EOS) over the time to finish the batch. Rounds alternate between the
two so other load on the machine hits both alike. The env's reward is 'length' so the numbers
compare generation, not reward-model scoring (pass --reward-model to include the RM).

    python bench/rollout_bench.py                         # SmolLM2, batch 8 and 32
    python bench/rollout_bench.py --model tiny --batches 8 --rounds 2   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cluster.config import load_config
from envs.data import load_prompts, resolve_path
from envs.prompting import prompt_ids


def generate_tokens_per_s(lm, tok, prompts: list[str], cfg, batch: int, seed: int) -> float:
    """One batched ``generate`` call over `batch` prompts; generated tokens (up to EOS) per second."""
    ids = [
        prompt_ids(tok, p, cfg.env.instruction, cfg.env.chat_template, cfg.env.max_prompt_tokens)
        for p in prompts[:batch]
    ]
    L = max(map(len, ids))
    x = torch.full((batch, L), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(batch, L, dtype=torch.long)
    for i, row in enumerate(ids):
        x[i, L - len(row) :], mask[i, L - len(row) :] = torch.tensor(row), 1
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = lm.generate(
            input_ids=x,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=cfg.env.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            use_cache=True,
        )
    dt = time.perf_counter() - t0
    new = out[:, L:]
    ended = (new == tok.eos_token_id).int().cumsum(1)
    tokens = int(((ended == 0) | ((ended == 1) & (new == tok.eos_token_id))).sum())  # up to and incl. EOS
    return tokens / dt


def make_runner(cfg, batch: int):
    """Training's EnvRunner (in this process) with `batch` vector-env slots."""
    from policies.algo import build_ppo_config
    from policies.env_runner import ResponseEnvRunner

    return ResponseEnvRunner(
        config=build_ppo_config(cfg, cfg.run.seed).env_runners(num_envs_per_env_runner=batch), worker_index=0
    )


def runner_tokens_per_s(runner, batch: int) -> float:
    """One whole response per slot, as a training iteration samples them; tokens per second."""
    t0 = time.perf_counter()
    episodes = runner.sample(num_episodes=batch, explore=True)
    dt = time.perf_counter() - t0
    return sum(len(e) for e in episodes) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reward-model", action="store_true", help="score with the reward model too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reward = "{reward_model: 1.0}" if args.reward_model else "{length: 1.0}"
    cfg = load_config(
        "demo",
        [
            f"model.policy={args.model}",
            f"env.max_new_tokens={args.max_new_tokens}",
            f"env.reward={reward}",
            "reward_model.backbone=tiny" if args.model == "tiny" else "run.seed=0",
        ],
    )
    prompts = load_prompts(resolve_path(cfg.data.prompts))
    from envs.models import load_causal_lm

    lm, tok = load_causal_lm(cfg.model.policy, cfg.model.dtype, cfg.model.tiny_vocab_size)
    print(f"model={args.model} max_new_tokens={args.max_new_tokens} threads={args.threads} rounds={args.rounds}")
    for batch in args.batches:
        runner = make_runner(cfg, batch)
        runner_tokens_per_s(runner, batch)  # warm-up
        generate_tokens_per_s(lm, tok, prompts, cfg, batch, 0)
        gen, rl = [], []
        for r in range(args.rounds):
            gen.append(generate_tokens_per_s(lm, tok, prompts[r * batch :], cfg, batch, r))
            rl.append(runner_tokens_per_s(runner, batch))
        kv = runner.module._kv
        g, e = statistics.median(gen), statistics.median(rl)
        print(
            f"batch {batch:3d}: generate {g:7.1f} tok/s | RLlib EnvRunner {e:7.1f} tok/s | ratio {e / g:.2f} "
            f"(best rounds: {max(gen):.1f} vs {max(rl):.1f}, ratio {max(rl) / max(gen):.2f}; "
            f"cache hit rate {kv.hits / max(kv.hits + kv.misses, 1):.2f})",
            flush=True,
        )
        runner.stop()


if __name__ == "__main__":
    main()
