"""Decoding with oneDNN-packed Linear weights vs plain ``nn.Linear``: step time by batch rows, same text, logit gap.

Loads the policy twice (``serve.pack_weights`` on and off), then, alternating the two in each round:

- a decoding step of ``rows`` sequences (a chat prompt prefilled, a few steps run first so the
  cache is warm) for each ``--rows``: median milliseconds per step;
- the largest absolute difference of the two models' next-token logits on the same batch;
- ``--requests`` greedy held-out requests of ``--tokens`` tokens through the serving scheduler
  (:func:`serve.scheduler.generate`, 16 together): whether both write the same text, and tokens/s.

    python bench/serve_packed_bench.py --out runs/serve_packed.json       # SmolLM2, one torch thread
    python bench/serve_packed_bench.py --model tiny --rows 1 4 --rounds 1 # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cluster.config import load_config
from envs.data import load_prompts, resolve_path
from envs.models import ModelSettings
from envs.prompting import prompt_ids
from serve.engine import GenerationEngine
from serve.kv_batch import RunningBatch
from serve.scheduler import generate


def step_ms(engine: GenerationEngine, prompt: list[int], rows: int, steps: int = 10) -> tuple[float, torch.Tensor]:
    """(median ms of one decoding step of ``rows`` copies of ``prompt``, the last step's logits)."""
    batch = RunningBatch(engine.model, engine.pad_id)
    logits = batch.admit([prompt] * rows)
    times = []
    for i in range(steps + 4):
        ids = logits.argmax(-1)
        start = time.perf_counter()
        logits = batch.step(ids)
        if i >= 4:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 9, 16])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    cfg, spec = load_config("demo"), ModelSettings(policy=args.model)
    engines = {
        "plain": GenerationEngine.from_spec(spec, 256, pack_weights=False),
        "packed": GenerationEngine.from_spec(spec, 256, pack_weights=True),
    }
    e, tok = cfg.env, engines["plain"].tokenizer
    texts = load_prompts(resolve_path(cfg.data.prompts), "test")[: args.requests]
    prompts = [prompt_ids(tok, t, e.instruction, e.chat_template, e.max_prompt_tokens) for t in texts]
    steps = {name: {r: [] for r in args.rows} for name in engines}
    tokens_per_s = {name: [] for name in engines}
    outputs, gaps = {}, {}
    for _ in range(args.rounds):
        for rows in args.rows:
            logits = {}
            for name, engine in engines.items():
                ms, logits[name] = step_ms(engine, prompts[0], rows)
                steps[name][rows].append(ms)
            gaps[rows] = max(gaps.get(rows, 0.0), float((logits["plain"] - logits["packed"]).abs().max()))
        for name, engine in engines.items():
            jobs = [engine.make_job(q, args.tokens, temperature=0.0, ignore_eos=True) for q in prompts]
            start = time.perf_counter()
            outputs[name] = [c.text for c in generate(engine, jobs)]
            tokens_per_s[name].append(len(jobs) * args.tokens / (time.perf_counter() - start))
    same = sum(a == b for a, b in zip(outputs["plain"], outputs["packed"]))
    print(f"model {args.model}, {args.threads} thread(s), median of {args.rounds} rounds")
    print(f"{'rows':>4} {'plain ms':>9} {'packed ms':>9} {'speed-up':>8} {'max |logit gap|':>16}")
    table = []
    for rows in args.rows:
        plain, packed = (statistics.median(steps[n][rows]) for n in ("plain", "packed"))
        print(f"{rows:4d} {plain:9.1f} {packed:9.1f} {plain / packed:7.2f}x {gaps[rows]:16.2e}")
        table.append(
            {
                "rows": rows,
                "plain_ms": plain,
                "packed_ms": packed,
                "speedup": plain / packed,
                "max_logit_gap": gaps[rows],
            }
        )
    tps = {n: statistics.median(v) for n, v in tokens_per_s.items()}
    print(
        f"{args.requests} greedy requests x {args.tokens} tokens through the scheduler: plain {tps['plain']:.1f} tok/s, "
        f"packed {tps['packed']:.1f} tok/s ({tps['packed'] / tps['plain']:.2f}x); same text {same}/{len(prompts)}"
    )
    if args.out:
        result = {"args": vars(args), "steps": table, "tokens_per_s": tps, "same_text": same, "requests": len(prompts)}
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
