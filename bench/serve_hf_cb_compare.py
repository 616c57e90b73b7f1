"""Our continuous-batching loop vs transformers' own continuous-batching manager, same model, same arrivals.

Both get ``--requests`` greedy requests of ``--tokens`` tokens (EOS ignored), arriving every
``--gap`` seconds (0 = all at once), and decode up to 16 sequences together: ours is
:class:`serve.scheduler.Scheduler` in its thread (what every replica runs); theirs is
``model.init_continuous_batching`` with a small paged cache (its default sizes the cache from 60%
of host RAM, which on a CPU took 30 s to set up) fed through ``add_request``. Reported per
implementation: wall time from the first arrival to the last completion, generated tokens/s,
mean latency, and whether the two wrote the same text for every request (greedy: they must).

What this does not measure, because transformers' manager cannot do it (checked on 5.24, see
the serving note): a seed per request (one process-global seed), temperature 0 next to sampled
requests (a greedy request fails every request of its batch), stop strings, a final output for a
cancelled request, per-request streams that keep their order. Those decide the choice anyway.

    python bench/serve_hf_cb_compare.py                 # SmolLM2, 16 requests, all at once and 0.2 s apart
    python bench/serve_hf_cb_compare.py --model tiny --gaps 0 0.01
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from cluster.config import load_config
from envs.data import load_prompts, resolve_path
from envs.models import ModelSettings
from envs.prompting import prompt_ids
from serve.engine import GenerationEngine
from serve.scheduler import Request, Scheduler


def ours(
    engine: GenerationEngine, prompts: list[list[int]], tokens: int, gap: float
) -> tuple[list[str], list[float], float]:
    """(texts, latencies, wall time) through our scheduler."""
    s = Scheduler(engine, max_batch_size=16, max_queue=len(prompts))
    s.start()
    texts, ends, done = [""] * len(prompts), [0.0] * len(prompts), threading.Semaphore(0)

    def sink(i: int):
        def emit(item):
            if item is None:
                ends[i] = time.perf_counter()
                done.release()
            elif isinstance(item, list):
                texts[i] += item[0].text

        return emit

    start, arrivals = time.perf_counter(), []
    for i, p in enumerate(prompts):
        time.sleep(max(0.0, start + i * gap - time.perf_counter()))
        arrivals.append(time.perf_counter())
        s.submit(Request([engine.make_job(p, tokens, temperature=0.0, ignore_eos=True)], sink(i)))
    for _ in prompts:
        done.acquire()
    s.stop()
    return texts, [e - a for e, a in zip(ends, arrivals)], max(ends) - start


def theirs(
    engine: GenerationEngine, prompts: list[list[int]], tokens: int, gap: float
) -> tuple[list[str], list[float], float]:
    """(texts, latencies, wall time) through transformers' ContinuousBatchingManager."""
    width = max(map(len, prompts)) + tokens
    cache = ContinuousBatchingConfig(
        page_size=32, num_blocks=16 * (width // 32 + 2), max_batch_tokens=2048, max_requests_per_batch=16
    )
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=engine.pad_id)
    manager = engine.model.init_continuous_batching(generation_config=config, continuous_batching_config=cache)
    manager.start()
    ends, outputs, ids = {}, {}, []

    def collect() -> None:
        while len(ends) < len(prompts):
            out = manager.get_result(timeout=1)
            if out is not None and out.status.name == "FINISHED":
                ends[out.request_id], outputs[out.request_id] = time.perf_counter(), out.generated_tokens

    reader = threading.Thread(target=collect)
    reader.start()
    start, arrivals = time.perf_counter(), []
    for i, p in enumerate(prompts):
        time.sleep(max(0.0, start + i * gap - time.perf_counter()))
        arrivals.append(time.perf_counter())
        ids.append(manager.add_request(p, request_id=f"r{i}", max_new_tokens=tokens, eos_token_id=-1))
    reader.join()
    manager.stop(block=True, timeout=10)
    texts = [engine.tokenizer.decode(outputs[r], skip_special_tokens=True) for r in ids]
    return texts, [ends[r] - a for r, a in zip(ids, arrivals)], max(ends.values()) - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--gaps", type=float, nargs="+", default=[0.0, 0.2], help="seconds between arrivals")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config("demo")
    # plain nn.Linear weights, as when the results in bench/results were measured (bench/serve_packed_bench.py measures packing)
    engine = GenerationEngine.from_spec(ModelSettings(policy=args.model), max_tokens_limit=256, pack_weights=False)
    e = cfg.env
    texts = load_prompts(resolve_path(cfg.data.prompts), "test")[: args.requests]
    prompts = [prompt_ids(engine.tokenizer, t, e.instruction, e.chat_template, e.max_prompt_tokens) for t in texts]
    ours(engine, prompts[:2], 4, 0.0)  # warm up both
    theirs(engine, prompts[:2], 4, 0.0)
    print(f"model {args.model}, {args.requests} greedy requests x {args.tokens} tokens, {args.threads} thread(s)")
    print(f"{'gap s':>6} {'impl':<13} {'wall s':>7} {'tok/s':>7} {'mean lat s':>10} {'same text':>9}")
    results = []
    for gap in args.gaps:
        runs = {"ours": [], "transformers": []}
        for _ in range(args.rounds):
            runs["ours"].append(ours(engine, prompts, args.tokens, gap))
            runs["transformers"].append(theirs(engine, prompts, args.tokens, gap))
        same = all(a[0] == b[0] for a, b in zip(runs["ours"], runs["transformers"]))
        for name, rs in runs.items():
            wall = statistics.median(r[2] for r in rs)
            lat = statistics.median(statistics.fmean(r[1]) for r in rs)
            tps = args.requests * args.tokens / wall
            print(f"{gap:6.2f} {name:<13} {wall:7.2f} {tps:7.1f} {lat:10.2f} {str(same):>9}")
            results.append(
                {
                    "gap_s": gap,
                    "impl": name,
                    "wall_s": wall,
                    "tokens_per_s": tps,
                    "mean_latency_s": lat,
                    "same_text": same,
                }
            )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
