"""Serving benchmark: batched vs batching-off Ray Serve deployments of the same model, side by side.

Both applications run in one Serve instance on loopback (``/batched`` with
``serve.max_batch_size=16``, ``/unbatched`` with ``serve.max_batch_size=1``; both with the default
``serve.batching=continuous``), each one replica with the same CPU and thread budget.
``bench/serve_continuous_bench.py`` compares continuous with static batching. Each is driven in turn by ``--clients`` concurrent
closed-loop clients sending ``--tokens``-token completions (``ignore_eos`` so every request
writes exactly that many tokens) for ``--duration`` seconds after a warm-up, alternating
between the two for ``--rounds`` rounds so that other load on the machine hits both alike. Reported: requests/s,
tokens/s, p50/p99 latency, the mean number of sequences per decoding step, and the ratio.

    python bench/serve_bench.py                      # SmolLM2, 16 clients, 32 tokens, 2 x 35 s each
    python bench/serve_bench.py --model tiny --duration 10   # a quick smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import httpx

PROMPTS = [
    "Write a short review of a science fiction movie.",
    "Describe your favourite film in a few sentences.",
    "What makes a comedy movie funny?",
    "Tell me about a movie with a surprising ending.",
]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def post_plain(client: httpx.AsyncClient, url: str, body: dict) -> float | None:
    """Latency of one whole (non-streamed) completion, or None if it failed or came back short."""
    t0 = time.perf_counter()
    r = await client.post(url + "/v1/completions", json=body)
    if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != body["max_tokens"]:
        return None
    return time.perf_counter() - t0


async def loop_counters(client: httpx.AsyncClient, url: str) -> tuple[float, int]:
    """(now, tokens the replica's generation loop has sampled so far): one per row per step, from ``/healthz``."""
    stats = (await client.get(url + "/healthz")).json()["batching"]
    return time.perf_counter(), stats["row_steps"]


async def drive(
    url: str, model: str, clients: int, tokens: int, duration: float, warmup: float, send: Callable = post_plain
) -> dict:
    """Closed-loop load: `clients` workers, each sending one request after another (`send` -> latency or None).

    Besides the requests completed inside the window it reads the tokens the server sampled in it: a
    static server completes requests in lumps of a whole batch, so a window's count depends on where
    the lumps fall (one batch of 16 in a 40 s window at 4 req/s is 9%), while the tokens are smooth.
    """
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        nonlocal errors
        k = 0
        while time.perf_counter() < stop_at:
            body = {"model": model, "prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": tokens}
            body |= {"temperature": 0.8, "seed": i * 1000 + k, "ignore_eos": True}
            latency = await send(client, url, body)
            k += 1
            if latency is None:
                errors += 1
            elif measure_from <= time.perf_counter() <= stop_at:  # completed inside the window
                latencies.append(latency)

    async def served() -> tuple[float, int]:
        """(seconds, tokens sampled) between the window's two reads of the loop's counters."""
        async with httpx.AsyncClient(timeout=60) as own:  # not queued behind the workers' connections
            await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
            t0, n0 = await loop_counters(own, url)
            await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
            t1, n1 = await loop_counters(own, url)
        return t1 - t0, n1 - n0

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        tasks = [asyncio.create_task(worker(i, client)) for i in range(clients)]
        window = asyncio.create_task(served())
        await asyncio.wait(tasks, timeout=stop_at - time.perf_counter())
        for task in tasks:  # requests still running past the window do not count: drop them
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        span, sampled = await window
    return {"latencies": latencies, "errors": errors, "duration": duration, "served_s": span, "served_tokens": sampled}


def window_line(run: dict, tokens: int) -> str:
    """One closed-loop window: served and completed requests/s."""
    served = run["served_tokens"] / run["served_s"] / tokens
    return f"  {served:.2f} req/s served, {len(run['latencies']) / run['duration']:.2f} completed"


def summarize(runs: list[dict], tokens: int) -> dict:
    """Merge the measuring windows of several rounds into one row of results.

    ``requests_per_s`` is the tokens the server sampled in the windows per second over ``tokens`` (see
    :func:`drive`); ``completed_per_s`` counts the requests that completed inside them.
    """
    latencies = [x for r in runs for x in r["latencies"]]
    duration = sum(r["duration"] for r in runs)
    if not latencies:
        raise RuntimeError("no request completed inside the measuring windows")
    served_tokens_per_s = sum(r["served_tokens"] for r in runs) / sum(r["served_s"] for r in runs)
    return {
        "requests": len(latencies),
        "errors": sum(r["errors"] for r in runs),
        "requests_per_s": served_tokens_per_s / tokens,
        "completed_per_s": len(latencies) / duration,
        "tokens_per_s": served_tokens_per_s,
        "p50_latency_s": statistics.median(latencies),
        "p99_latency_s": percentile(latencies, 0.99),
    }


def start_apps(args: argparse.Namespace, apps: dict[str, list[str]], common: list[str]) -> tuple[dict[str, str], str]:
    """Start Ray and one application per name (its own overrides on top of `common`) -> (URLs, served model id)."""
    import ray

    from cluster.config import load_config
    from cluster.serving import start_app
    from policies.export import resolve_policy

    cpus = max(2, len(apps)) * args.cpus  # Ray's logical CPUs: room for every application's replica
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    base = [f"serve.port={args.port}", f"serve.num_cpus_per_replica={args.cpus}", f"run.torch_threads={args.threads}"]
    urls = {
        name: start_app(args.model, load_config(None, base + common + extra), name=name, route_prefix=f"/{name}")
        for name, extra in apps.items()
    }
    return urls, resolve_policy(args.model)[1]


def start(args: argparse.Namespace) -> tuple[dict[str, str], str]:
    """The batched and the unbatched application."""
    common = [
        "serve.max_tokens_limit=256",
        "serve.max_ongoing_requests=64",
        f"serve.batch_wait_timeout_s={args.batch_wait}",
        f"serve.dtype={args.dtype}",
    ]
    return start_apps(
        args, {"batched": [f"serve.max_batch_size={args.clients}"], "unbatched": ["serve.max_batch_size=1"]}, common
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2, tiny, or an HF model / run directory")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--duration", type=float, default=35.0, help="measured seconds per deployment and round")
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="alternate batched/unbatched this many times (evens out other load on the machine)",
    )
    p.add_argument("--warmup", type=float, default=15.0, help="unmeasured seconds before each measurement")
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs (Ray resource) per replica")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica (same for both)")
    p.add_argument(
        "--batch-wait",
        type=float,
        default=0.1,
        help="serve.batch_wait_timeout_s of the batched deployment (a wave of requests through the proxy spreads over tens of ms)",
    )
    p.add_argument("--dtype", default="float32", help="serve.dtype of both (float32: the recorded results' dtype)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()

    import ray
    from ray import serve

    urls, model = start(args)
    runs: dict[str, list[dict]] = {"batched": [], "unbatched": []}
    results = {}
    try:
        for round_ in range(args.rounds):
            for name in runs:
                print(
                    f"round {round_ + 1}/{args.rounds}: {name} ({args.clients} clients, {args.tokens} tokens, "
                    f"{args.duration:.0f} s)",
                    flush=True,
                )
                run = asyncio.run(drive(urls[name], model, args.clients, args.tokens, args.duration, args.warmup))
                runs[name].append(run)
                print(window_line(run, args.tokens), flush=True)
        for name in runs:
            results[name] = summarize(runs[name], args.tokens)
            results[name]["mean_rows"] = httpx.get(urls[name] + "/healthz").json()["batching"]["mean_rows"]
    finally:
        serve.shutdown()
        ray.shutdown()
    ratio = results["batched"]["requests_per_s"] / results["unbatched"]["requests_per_s"]
    print(
        f"\nmodel {args.model}, {args.clients} concurrent clients, {args.tokens}-token completions, "
        f"{args.threads} torch thread(s) per replica"
    )
    print(
        f"{'deployment':<11} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} {'rows/step':>9} {'n':>5} {'err':>4}"
    )
    for name, r in results.items():
        print(
            f"{name:<11} {r['requests_per_s']:7.2f} {r['tokens_per_s']:7.1f} {r['p50_latency_s']:7.2f} "
            f"{r['p99_latency_s']:7.2f} {r['mean_rows']:9.1f} {r['requests']:5d} {r['errors']:4d}"
        )
    print(f"batched / unbatched requests per second: {ratio:.2f}x (target >= 4x)")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
