"""Serving benchmark: continuous vs static batching of the same model, side by side in one run.

Two applications run in one Serve instance on loopback (``/continuous`` with
``serve.batching=continuous``, ``/static`` with ``serve.batching=static``), each one replica with
the same CPU and thread budget and ``serve.max_batch_size=16``. Every request is a
``--tokens``-token completion (``ignore_eos``, so each writes exactly that many tokens). Rounds
alternate between the two so other load on the machine hits both alike.

1. Closed loop: ``--clients`` clients each send one request after another for ``--duration``
   seconds (static batching's best case: full batches). Reported: requests/s, p50/p99 latency.
   With ``--capacity streamed`` (the default) the static server is also driven this way with
   streamed requests, the kind the next step sends (a token at a time costs the server more).
2. Staggered load: Poisson arrivals at ``--load`` (0.7) times the static server's closed-loop
   requests/s from step 1 (streamed, unless ``--capacity plain``), the same arrival times for
   both, streamed, for ``--poisson-duration`` seconds (requests of the first ``--warmup`` seconds
   are not counted). Reported: throughput (completed requests / time from first arrival to last
   completion), mean and p99 time to first token, p50/p99 latency, and the generation loop's mean
   rows per step and time per step (model, sampling and hand-over, from ``/healthz``).

    python bench/serve_continuous_bench.py                       # SmolLM2: about 14 minutes
    python bench/serve_continuous_bench.py --model tiny --duration 10 --poisson-duration 15 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import httpx
from serve_bench import PROMPTS, drive, percentile, start_apps, summarize, window_line

MODES = ("continuous", "static")


async def one_streamed(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, float] | None:
    """(time to first token, latency) of one streamed completion, or None if it failed."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return None
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"choices":[{' in line:
                first = first or time.perf_counter()
                tokens += 1
    return (first - t0, time.perf_counter() - t0) if first else None


async def post_streamed(client: httpx.AsyncClient, url: str, body: dict) -> float | None:
    """Latency of one streamed completion, or None if it failed (for :func:`serve_bench.drive`)."""
    result = await one_streamed(client, url, body)
    return None if result is None else result[1]


async def poisson(url: str, model: str, rate: float, tokens: int, duration: float, warmup: float, seed: int) -> dict:
    """Open-loop Poisson arrivals at `rate` per second for `duration` seconds; every request streamed."""
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration:
        arrivals.append(t)
        t += rng.expovariate(rate)
    results: list = [None] * len(arrivals)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()

        async def request(i: int) -> None:
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0.8}
            results[i] = await one_streamed(client, url, {**body, "seed": seed * 100_000 + i, "ignore_eos": True})
            if results[i] is not None:
                results[i] = (*results[i], time.perf_counter() - start)

        await asyncio.gather(*(request(i) for i in range(len(arrivals))))
    kept = [(a, r) for a, r in zip(arrivals, results) if a >= warmup]
    done = [r for _, r in kept if r is not None]
    return {
        "ttft": [r[0] for r in done],
        "latency": [r[1] for r in done],
        "span": max(r[2] for r in done) - kept[0][0] if done else float("nan"),
        "sent": len(kept),
        "errors": len(kept) - len(done),
    }


def loop_stats(url: str) -> dict:
    """The generation loop's counters that the Poisson summary turns into rows per step and time per step."""
    stats = httpx.get(url + "/healthz").json()["batching"]
    return {k: stats[k] for k in ("steps", "row_steps", "step_seconds")}


def poisson_summary(runs: list[dict]) -> dict:
    """Merge Poisson rounds into one row."""
    ttft = [x for r in runs for x in r["ttft"]]
    latency = [x for r in runs for x in r["latency"]]
    return {
        "requests": len(latency),
        "errors": sum(r["errors"] for r in runs),
        "throughput_req_s": len(latency) / sum(r["span"] for r in runs),
        "mean_ttft_s": statistics.fmean(ttft),
        "p99_ttft_s": percentile(ttft, 0.99),
        "p50_latency_s": statistics.median(latency),
        "p99_latency_s": percentile(latency, 0.99),
        "mean_rows": sum(r["loop"]["row_steps"] for r in runs) / max(1, sum(r["loop"]["steps"] for r in runs)),
        "ms_per_step": 1000
        * sum(r["loop"]["step_seconds"] for r in runs)
        / max(1, sum(r["loop"]["steps"] for r in runs)),
    }


def common_overrides(batch_wait: float, dtype: str = "float32") -> list[str]:
    """The serve settings every application of a batching comparison shares (16 rows, room to queue)."""
    return [
        "serve.max_tokens_limit=256",
        "serve.max_batch_size=16",
        "serve.max_queue=64",
        "serve.max_ongoing_requests=128",
        f"serve.batch_wait_timeout_s={batch_wait}",
        f"serve.dtype={dtype}",
    ]


def start(args: argparse.Namespace) -> tuple[dict[str, str], str]:
    """Start Ray and the two applications; return their URLs and the served model id."""
    modes = {mode: [f"serve.batching={mode}"] for mode in MODES}
    return start_apps(args, modes, common_overrides(args.batch_wait, args.dtype))


def report(closed: dict, open_: dict, rate: float, args, streamed: dict | None = None) -> dict:
    """Print both tables and the ratios the issue sets targets for; return the ratios."""
    print(
        f"\nmodel {args.model} ({args.dtype}), {args.tokens}-token completions, {args.threads} torch thread(s) per replica"
    )
    print(f"closed loop, {args.clients} clients:")
    print(f"  {'mode':<11} {'req/s':>7} {'done/s':>7} {'p50 s':>7} {'p99 s':>7} {'rows/step':>9} {'n':>5} {'err':>4}")
    for mode, r in closed.items():
        print(
            f"  {mode:<11} {r['requests_per_s']:7.2f} {r['completed_per_s']:7.2f} {r['p50_latency_s']:7.2f} "
            f"{r['p99_latency_s']:7.2f} {r['mean_rows']:9.1f} {r['requests']:5d} {r['errors']:4d}"
        )
    for mode, r in (streamed or {}).items():
        print(
            f"  {mode + ' sse':<11} {r['requests_per_s']:7.2f} {r['completed_per_s']:7.2f} {r['p50_latency_s']:7.2f} "
            f"{r['p99_latency_s']:7.2f} {'':>9} {r['requests']:5d} {r['errors']:4d}"
        )
    print(
        "  (req/s: tokens the server sampled in the windows / tokens per request; done/s: requests completed in them)"
    )
    kind = "streamed " if streamed else ""
    print(f"Poisson arrivals at {rate:.2f} req/s ({args.load:.0%} of static's {kind}closed-loop req/s), streamed:")
    head = f"{'req/s':>7} {'TTFT':>7} {'p99TTFT':>7} {'p50 s':>7} {'p99 s':>7} {'rows':>5} {'ms/step':>7}"
    print(f"  {'mode':<11} {head} {'n':>5} {'err':>4}")
    for mode, r in open_.items():
        print(
            f"  {mode:<11} {r['throughput_req_s']:7.2f} {r['mean_ttft_s']:7.3f} {r['p99_ttft_s']:7.2f} "
            f"{r['p50_latency_s']:7.2f} {r['p99_latency_s']:7.2f} {r['mean_rows']:5.1f} {r['ms_per_step']:7.1f} "
            f"{r['requests']:5d} {r['errors']:4d}"
        )
    c, s, pc, ps = closed["continuous"], closed["static"], open_["continuous"], open_["static"]
    ratios = {
        "closed_loop_req_s": c["requests_per_s"] / s["requests_per_s"],
        "closed_loop_req_s_rounds": [a / b for a, b in zip(c["rounds_req_s"], s["rounds_req_s"])],
        "poisson_p99_latency": pc["p99_latency_s"] / ps["p99_latency_s"],
        "poisson_mean_ttft": pc["mean_ttft_s"] / ps["mean_ttft_s"],
        "poisson_throughput": pc["throughput_req_s"] / ps["throughput_req_s"],
    }
    print("continuous / static:")
    rounds = ", ".join(f"{x:.2f}" for x in ratios["closed_loop_req_s_rounds"])
    print(f"  closed-loop req/s    {ratios['closed_loop_req_s']:.2f}x (target >= 1.0; rounds: {rounds})")
    print(f"  Poisson p99 latency  {ratios['poisson_p99_latency']:.2f}x (target <= 0.5)")
    print(f"  Poisson mean TTFT    {ratios['poisson_mean_ttft']:.2f}x (target <= 0.3)")
    print(f"  Poisson throughput   {ratios['poisson_throughput']:.2f}x (target >= 1.0)")
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2, tiny, or an HF model / run directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--duration", type=float, default=40.0, help="closed loop: measured seconds per mode and round")
    p.add_argument("--warmup", type=float, default=10.0, help="unmeasured seconds before each measurement")
    p.add_argument(
        "--poisson-duration", type=float, default=90.0, help="Poisson: seconds of arrivals per mode and round"
    )
    p.add_argument("--load", type=float, default=0.7, help="Poisson rate as a share of static's closed-loop req/s")
    p.add_argument("--rate", type=float, default=None, help="Poisson rate in req/s (default: --load x static capacity)")
    p.add_argument(
        "--capacity",
        default="streamed",
        choices=["streamed", "plain"],
        help="static's capacity for the Poisson rate: closed loop with streamed requests (also measured) or plain ones",
    )
    p.add_argument("--rounds", type=int, default=2, help="alternate the two modes this many times")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs (Ray resource) per replica")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica (same for both)")
    p.add_argument(
        "--batch-wait", type=float, default=0.1, help="serve.batch_wait_timeout_s (static gathers this long)"
    )
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    if args.warmup >= args.poisson_duration:
        p.error(
            f"--poisson-duration ({args.poisson_duration}) must exceed --warmup ({args.warmup}): nothing would be measured"
        )

    import ray
    from ray import serve

    urls, model = start(args)
    closed_runs: dict[str, list] = {m: [] for m in MODES}
    streamed_runs: list = []
    open_runs: dict[str, list] = {m: [] for m in MODES}
    try:
        for round_ in range(args.rounds):
            for mode in MODES:
                print(f"round {round_ + 1}/{args.rounds}: closed loop, {mode}", flush=True)
                run = asyncio.run(drive(urls[mode], model, args.clients, args.tokens, args.duration, args.warmup))
                closed_runs[mode].append(run)
                print(window_line(run, args.tokens), flush=True)
            if args.capacity == "streamed":
                print(f"round {round_ + 1}/{args.rounds}: closed loop, static, streamed", flush=True)
                run = asyncio.run(
                    drive(urls["static"], model, args.clients, args.tokens, args.duration, args.warmup, post_streamed)
                )
                streamed_runs.append(run)
                print(window_line(run, args.tokens), flush=True)
        closed = {m: summarize(closed_runs[m], args.tokens) for m in MODES}
        for mode in MODES:
            closed[mode]["rounds_req_s"] = [r["served_tokens"] / r["served_s"] / args.tokens for r in closed_runs[mode]]
        for mode in MODES:
            closed[mode]["mean_rows"] = httpx.get(urls[mode] + "/healthz").json()["batching"]["mean_rows"]
        streamed = {"static": summarize(streamed_runs, args.tokens)} if streamed_runs else {}
        capacity = (streamed or closed)["static"]["requests_per_s"]
        rate = args.rate or args.load * capacity
        for round_ in range(args.rounds):
            for mode in MODES:
                print(f"round {round_ + 1}/{args.rounds}: Poisson {rate:.2f} req/s, {mode}", flush=True)
                before = loop_stats(urls[mode])
                run = asyncio.run(
                    poisson(urls[mode], model, rate, args.tokens, args.poisson_duration, args.warmup, seed=round_)
                )
                run["loop"] = {k: v - before[k] for k, v in loop_stats(urls[mode]).items()}
                open_runs[mode].append(run)
                print(
                    f"  mean TTFT {statistics.fmean(run['ttft']):.3f} s, p99 {percentile(run['latency'], 0.99):.2f} s",
                    flush=True,
                )
        open_ = {m: poisson_summary(open_runs[m]) for m in MODES}
    finally:
        serve.shutdown()
        ray.shutdown()
    ratios = report(closed, open_, rate, args, streamed)
    if args.out:
        out = {"args": vars(args), "closed_loop": closed, "closed_loop_streamed": streamed, "poisson": open_}
        Path(args.out).write_text(json.dumps(out | {"rate": rate, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
