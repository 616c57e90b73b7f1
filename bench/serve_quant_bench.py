"""Quantised serving: tokens/s of float32, int8 and bfloat16 serving of one policy, and what each costs in quality.

1. Speed: the serving loop (``serve.scheduler``, the code every replica runs) writes ``--batch``
   sequences of ``--tokens`` tokens (``ignore_eos``) from held-out prompts, rounds alternating
   between the dtypes so other load hits all alike. Reported: generated tokens/s, ratio to float32.
2. Quality, on ``--prompts`` held-out prompts (``data/prompts.parquet``, split ``test``, formatted as
   in training: the preset's instruction, chat template and prompt limit): each dtype samples one
   response per prompt the way ``alignray eval`` does (temperature 1, same seed), then
   - KL(quantised || float32) per token: the exact KL over the vocabulary at every position of
     the quantised policy's own responses (EOS included), averaged over those tokens, in nats;
   - the gold score (VADER compound) of each dtype's responses.
   A dtype is fit to be the default only if its KL is below ``--kl-budget`` (0.02 nats/token).

    python bench/serve_quant_bench.py                      # SmolLM2: about 10 minutes on 2 cores
    python bench/serve_quant_bench.py --model tiny --prompts 16 --rounds 1
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
from envs.gold import gold_scores
from envs.models import ModelSettings
from envs.prompting import prompt_ids
from policies.evaluation import sample
from serve.engine import GenerationEngine
from serve.quantize import SERVE_DTYPES
from serve.scheduler import generate


def tokens_per_s(engine: GenerationEngine, prompts: list[list[int]], tokens: int, seed: int) -> float:
    """One batch through the serving loop: generated tokens per second."""
    jobs = [engine.make_job(p, tokens, temperature=1.0, seed=seed + i, ignore_eos=True) for i, p in enumerate(prompts)]
    start = time.perf_counter()
    done = generate(engine, jobs)
    return sum(c.completion_tokens for c in done) / (time.perf_counter() - start)


@torch.inference_mode()
def per_token_kl(
    model_q, model_p, prompts: list[list[int]], responses: list[list[int]], batch: int = 16
) -> list[float]:
    """KL(q || p) in nats at every response position (the distribution of each response token), all responses."""
    out: list[float] = []
    for i in range(0, len(prompts), batch):
        seqs = [p + r for p, r in zip(prompts[i : i + batch], responses[i : i + batch])]
        resp = responses[i : i + batch]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)  # right-padded: padding cannot reach earlier positions
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
        rows = torch.tensor([j for j, r in enumerate(resp) for _ in r], dtype=torch.long)  # (N,)
        pos = torch.tensor([len(s) - len(r) - 1 + t for s, r in zip(seqs, resp) for t in range(len(r))])  # (N,)
        if not len(rows):
            continue
        logq = torch.log_softmax(model_q(input_ids=ids, attention_mask=mask).logits[rows, pos].float(), -1)  # (N, V)
        logp = torch.log_softmax(model_p(input_ids=ids, attention_mask=mask).logits[rows, pos].float(), -1)  # (N, V)
        out += (logq.exp() * (logq - logp)).sum(-1).tolist()
    return out


def quality(engines: dict[str, GenerationEngine], prompts: list[list[int]], tokens: int, seed: int, save=None) -> dict:
    """Per dtype (in the order given): mean per-token KL to float32 on its own samples, gold score, mean length.

    ``save`` is called with the results so far after each dtype (a cut-off run keeps what it measured).
    """
    tok = engines["float32"].tokenizer
    out = {}
    for name, engine in engines.items():
        responses = sample(engine.model, tok, prompts, tokens, temperature=1.0, seed=seed)
        texts = [tok.decode(r, skip_special_tokens=True).strip() for r in responses]
        kl = per_token_kl(engine.model, engines["float32"].model, prompts, responses) if name != "float32" else [0.0]
        golds = gold_scores(texts)
        out[name] = {
            "kl_per_token": statistics.fmean(kl),
            "kl_tokens": len(kl),
            "gold_score": statistics.fmean(golds),
            "gold_sem": statistics.stdev(golds) / len(golds) ** 0.5,
            "length": statistics.fmean(len(r) for r in responses),
        }
        print(
            f"  {name}: KL {out[name]['kl_per_token']:.4f} nats/token, gold {out[name]['gold_score']:.3f}", flush=True
        )
        if save is not None:
            save(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2, tiny, or an exported policy directory")
    p.add_argument("--preset", default="demo", help="config preset giving the prompt format and response length")
    p.add_argument("--dtypes", nargs="+", default=list(SERVE_DTYPES), choices=SERVE_DTYPES)
    p.add_argument("--batch", type=int, default=16, help="speed: sequences decoded together")
    p.add_argument("--tokens", type=int, default=32, help="speed: tokens per sequence")
    p.add_argument("--rounds", type=int, default=3, help="speed: alternate the dtypes this many times")
    p.add_argument("--prompts", type=int, default=200, help="quality: held-out prompts")
    p.add_argument("--kl-budget", type=float, default=0.02, help="nats/token a default dtype may cost")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a replica's default is 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset)
    spec = ModelSettings(policy=args.model)
    engines = {d: GenerationEngine.from_spec(spec, 256, dtype=d) for d in dict.fromkeys(["float32", *args.dtypes])}
    e = cfg.env
    held_out = load_prompts(resolve_path(cfg.data.prompts), "test")[: args.prompts]
    tok = engines["float32"].tokenizer
    prompts = [prompt_ids(tok, t, e.instruction, e.chat_template, e.max_prompt_tokens) for t in held_out]

    speed: dict[str, list[float]] = {d: [] for d in engines}
    for round_ in range(args.rounds):
        for d, engine in engines.items():
            speed[d].append(tokens_per_s(engine, prompts[: args.batch], args.tokens, seed=args.seed + round_))
            print(f"round {round_ + 1}/{args.rounds}: {d} {speed[d][-1]:.1f} tokens/s", flush=True)
    print(f"quality on {len(prompts)} held-out prompts, {e.max_new_tokens}-token responses:", flush=True)
    # float32 first, then the fastest dtype first: emulated bfloat16 is slow, and a cut-off run keeps the rest
    order = ["float32", *sorted((d for d in engines if d != "float32"), key=lambda d: -statistics.median(speed[d]))]

    def save(partial: dict) -> None:
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "speed": speed, "quality": partial}, indent=2))

    save({})
    qual = quality({d: engines[d] for d in order}, prompts, e.max_new_tokens, args.seed, save)

    base = statistics.median(speed["float32"])
    print(f"\nmodel {args.model}, batch {args.batch} x {args.tokens} tokens, {args.threads} torch thread(s)")
    print(f"{'dtype':<9} {'tok/s':>7} {'vs fp32':>7} {'KL/token':>9} {'gold':>14} {'default-fit':>11}")
    results = {}
    for d in engines:
        tps = statistics.median(speed[d])
        q = qual[d]
        fit = q["kl_per_token"] < args.kl_budget
        results[d] = {"tokens_per_s": tps, "speed_ratio": tps / base, "rounds": speed[d], **q, "default_fit": fit}
        gold = f"{q['gold_score']:.3f}±{q['gold_sem']:.3f}"
        print(f"{d:<9} {tps:7.1f} {tps / base:6.2f}x {q['kl_per_token']:9.4f} {gold:>14} {str(fit):>11}")
    print(f"default-fit: KL(dtype || float32) < {args.kl_budget} nats/token")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
