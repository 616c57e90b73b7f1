"""Prefilling with a shared prefix's keys and values reused vs computed again: admission cost, same logits.

SmolLM2 with packed weights, one torch thread, the demo's held-out chat prompts (the chat template's
system turn and the instruction are shared by all of them). Alternating the two settings of
``RunningBatch(share_prefix=...)`` in each round:

- a continuous-batching admission: 15 running rows decode one step while 1 new prompt is prefilled
  (:meth:`~serve.kv_batch.RunningBatch.step_and_admit`), against a plain decoding step of 16 rows;
- a static batch's prefill of 16 prompts at once (:meth:`~serve.kv_batch.RunningBatch.admit`);
- the largest gap between the two settings' next-token logits after the admission.

    python bench/serve_prefix_bench.py --out runs/serve_prefix.json
    python bench/serve_prefix_bench.py --model tiny --rounds 1     # smoke
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


def measure(engine: GenerationEngine, prompts: list[list[int]], share: bool) -> dict:
    """Seconds of one admission step, one plain step and a 16-prompt prefill; the admission's logits."""
    warm = RunningBatch(engine.model, engine.pad_id, share_prefix=share)
    warm.admit(prompts[:1])  # an earlier prompt to share (what a running server has seen)
    start = time.perf_counter()
    warm.admit(prompts[1:17])
    prefill = time.perf_counter() - start
    batch = RunningBatch(engine.model, engine.pad_id, share_prefix=share)
    logits = batch.admit(prompts[:16])
    for _ in range(4):
        logits = batch.step(logits.argmax(-1))
    start = time.perf_counter()
    logits = batch.step(logits.argmax(-1))
    plain = time.perf_counter() - start
    batch.keep(list(range(1, 16)))
    start = time.perf_counter()
    logits = batch.step_and_admit(logits[1:].argmax(-1), [prompts[17]])
    admission = time.perf_counter() - start
    return {"prefill16_s": prefill, "step16_s": plain, "admission_s": admission, "logits": logits}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config("demo")
    engine = GenerationEngine.from_spec(ModelSettings(policy=args.model), 256)
    e = cfg.env
    texts = load_prompts(resolve_path(cfg.data.prompts), "test")[:18]
    prompts = [prompt_ids(engine.tokenizer, t, e.instruction, e.chat_template, e.max_prompt_tokens) for t in texts]
    runs = {True: [], False: []}
    for _ in range(args.rounds):
        for share in (True, False):
            runs[share].append(measure(engine, prompts, share))
    gap = max(float((a["logits"] - b["logits"]).abs().max()) for a, b in zip(runs[True], runs[False]))
    shared = RunningBatch(engine.model, engine.pad_id)
    shared.admit(prompts[:1])
    k = shared.prefix.match(prompts[1:], own=1)
    table = {}
    print(
        f"model {args.model}, {args.threads} thread(s), median of {args.rounds} rounds; prompts {min(map(len, prompts))}-"
        f"{max(map(len, prompts))} tokens, {k} shared"
    )
    for key in ("step16_s", "admission_s", "prefill16_s"):
        on, off = (statistics.median(r[key] for r in runs[s]) for s in (True, False))
        table[key] = {"shared": on, "recomputed": off, "speedup": off / on}
        print(f"  {key:<12} recomputed {1000 * off:8.1f} ms   shared {1000 * on:8.1f} ms   {off / on:5.2f}x")
    print(f"  max |logit gap| after the admission: {gap:.2e}")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"args": vars(args), "shared_tokens": k, "results": table, "max_logit_gap": gap}, indent=2)
        )


if __name__ == "__main__":
    main()
