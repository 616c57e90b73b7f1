"""Serving benchmark: the replica's GIL switch interval (``serve.gil_switch_interval_ms``), A/B in one run.

Four applications run in one Serve instance on loopback: continuous and static batching, each with the
interval at Python's default (5 ms) and at ``--interval`` (the setting's default, 0.5 ms); one replica
each, ``serve.max_batch_size=16``. Rounds alternate over the four, each driven in closed loop by
``--clients`` clients with ``--tokens``-token completions, plain and streamed, so drift in the machine's
speed hits all alike. Reported per application: requests/s (the tokens the server sampled in the windows
over tokens per request, as ``serve_continuous_bench.py`` counts them), the generation loop's time per
step, and the two ratios that matter: each mode at the short interval over itself at 5 ms, and continuous
over static at each interval.

Why: the generation loop runs in a thread of the replica's process, beside the event loop that turns
its steps into HTTP responses; each torch op releases the GIL, and getting it back waits up to the
switch interval whenever the event loop is running Python.

    python bench/serve_gil_bench.py                  # SmolLM2, 3 rounds: about 11 minutes
    python bench/serve_gil_bench.py --model tiny --duration 8 --warmup 3 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from serve_bench import drive, start_apps, summarize, window_line
from serve_continuous_bench import common_overrides, loop_stats, post_streamed

MODES = ("continuous", "static")
DEFAULT_MS = 5.0  # sys.getswitchinterval() of a fresh interpreter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2, tiny, or an HF model / run directory")
    p.add_argument("--interval", type=float, default=0.5, help="the short switch interval in ms")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per window")
    p.add_argument("--warmup", type=float, default=6.0, help="unmeasured seconds before each window")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--batch-wait", type=float, default=0.1, help="serve.batch_wait_timeout_s (static)")
    p.add_argument("--port", type=int, default=8767)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    args.cpus = 0.5  # four replicas on the machine's two CPUs; only one is driven at a time

    import ray
    from ray import serve

    names = {f"{mode}_{ms:g}ms": (mode, ms) for ms in (DEFAULT_MS, args.interval) for mode in MODES}
    common = common_overrides(args.batch_wait)
    apps = {
        name.replace(".", "_"): [f"serve.batching={mode}", f"serve.gil_switch_interval_ms={ms}"]
        for name, (mode, ms) in names.items()
    }
    urls, model = start_apps(args, apps, common)
    runs: dict[tuple[str, str], list] = {(app, kind): [] for app in apps for kind in ("plain", "sse")}
    ms_per_step: dict[tuple[str, str], list] = {key: [] for key in runs}
    try:
        for round_ in range(args.rounds):
            for app in apps:
                for kind, send in (("plain", {}), ("sse", {"send": post_streamed})):
                    print(f"round {round_ + 1}/{args.rounds}: {app}, {kind}", flush=True)
                    before = loop_stats(urls[app])
                    run = asyncio.run(
                        drive(urls[app], model, args.clients, args.tokens, args.duration, args.warmup, **send)
                    )
                    after = loop_stats(urls[app])
                    runs[app, kind].append(run)
                    ms_per_step[app, kind].append(
                        1000 * (after["step_seconds"] - before["step_seconds"]) / (after["steps"] - before["steps"])
                    )
                    print(window_line(run, args.tokens), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    results = {
        f"{app}/{kind}": summarize(r, args.tokens)
        | {"ms_per_step": sum(ms_per_step[app, kind]) / len(r), "rounds_req_s": [window(x, args.tokens) for x in r]}
        for (app, kind), r in runs.items()
    }
    print(f"\nmodel {args.model}, {args.clients} clients, {args.tokens}-token completions, {args.threads} thread(s)")
    print(f"  {'application':<22} {'req/s':>7} {'ms/step':>8} {'p50 s':>7}   rounds")
    for key, r in results.items():
        rounds = ", ".join(f"{x:.2f}" for x in r["rounds_req_s"])
        print(f"  {key:<22} {r['requests_per_s']:7.2f} {r['ms_per_step']:8.1f} {r['p50_latency_s']:7.2f}   {rounds}")
    short = f"{args.interval:g}ms".replace(".", "_")
    ratios = {}
    for kind in ("plain", "sse"):
        for mode in MODES:
            ratios[f"{mode}/{kind}: {short} over 5ms"] = _ratio(results, f"{mode}_{short}/{kind}", f"{mode}_5ms/{kind}")
        for ms in ("5ms", short):
            ratios[f"continuous over static, {ms}/{kind}"] = _ratio(
                results, f"continuous_{ms}/{kind}", f"static_{ms}/{kind}"
            )
    print("ratios of requests/s (overall; per round):")
    for name, (overall, per_round) in ratios.items():
        print(f"  {name:<38} {overall:.2f}x ({', '.join(f'{x:.2f}' for x in per_round)})")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "ratios": ratios}, indent=2))


def window(run: dict, tokens: int) -> float:
    """One window's requests/s from the tokens the server sampled in it."""
    return run["served_tokens"] / run["served_s"] / tokens


def _ratio(results: dict, a: str, b: str) -> tuple[float, list[float]]:
    """(overall ratio of requests/s, the ratio in each round) of application a over b."""
    per_round = [x / y for x, y in zip(results[a]["rounds_req_s"], results[b]["rounds_req_s"])]
    return results[a]["requests_per_s"] / results[b]["requests_per_s"], per_round


if __name__ == "__main__":
    main()
