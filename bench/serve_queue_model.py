"""What continuous batching's p99 can reach on this machine: the replica's own scheduler on a virtual clock.

``serve_continuous_bench.py`` measures the Poisson p99 latency over three 60 s windows per mode: a few
bursts decide a p99 and the 2-core machine drifts by about 10% between windows, so the measured
continuous/static ratio has moved between 0.55x and 0.93x across runs. This script separates the
scheduling from that noise. It runs the serving code's own :class:`~serve.scheduler.Scheduler`
(first come first served, ``max_batch_size`` rows, static's batch wait) with the model's forward
passes replaced by their cost, measured here on the chosen model first:

- a decoding step of B rows (forward and sampling): ``step_ms + row_ms * B``;
- a prompt joining a running step (one fused pass): ``+ join_token_ms`` per prompt token;
- a prefill with no running rows (static's batches, an idle continuous server):
  ``prefill_ms + prefill_token_ms * tokens``.

Time is virtual, so many arrival seeds of several minutes each take seconds, and the p99 ratio comes
with a spread. The static server's capacity is its closed-loop rate with ``--clients`` clients on the
same clock; the Poisson rate is ``--load`` of it, as in the live benchmark. Besides the measured costs,
the script answers what the target would need: the same with prompts joining a running step for free (``join_token_ms = 0``).

    python bench/serve_queue_model.py --out runs/serve_queue_model.json     # SmolLM2, ~2 min
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import PROMPTS  # noqa: E402

from envs import tiny  # noqa: E402
from envs.models import ModelSettings  # noqa: E402
from serve.engine import GenerationEngine, sample_next  # noqa: E402
from serve.kv_batch import RunningBatch  # noqa: E402
from serve.quantize import load_policy  # noqa: E402
from serve.scheduler import Request, Scheduler  # noqa: E402

MODES = ("continuous", "static")


@dataclass(frozen=True)
class Costs:
    """Milliseconds of the passes a replica runs (see the module docstring)."""

    step_ms: float
    row_ms: float
    join_token_ms: float
    prefill_ms: float
    prefill_token_ms: float


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def measure_costs(model, tok, rows: list[int], repeats: int = 9) -> Costs:
    """Time decoding steps, fused admissions and prefills of the live batch code on this model (1 thread)."""
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    probe = GenerationEngine(model, tok, 64)
    jobs = [probe.make_job(prompts[0], 32, temperature=0.8) for _ in range(max(rows))]
    gens = [torch.Generator().manual_seed(i) for i in range(max(rows))]

    def batch_of(n: int) -> tuple[RunningBatch, torch.Tensor]:
        batch = RunningBatch(model, pad, share_prefix=False)
        ids = batch.admit([prompts[i % len(prompts)] for i in range(n)]).argmax(-1)
        for _ in range(4):
            ids = batch.step(ids).argmax(-1)
        return batch, ids

    def decode_ms(batch: RunningBatch, ids: torch.Tensor, new: list[list[int]]) -> float:
        """One step of the batch's rows (joined by ``new`` prompts) and its sampling."""
        start, n = time.perf_counter(), batch.rows + len(new)
        logits = batch.step_and_admit(ids, new) if new else batch.step(ids)
        sample_next(logits, jobs[:n], gens[:n])
        return 1000 * (time.perf_counter() - start)

    def prefill_time(batch_prompts: list[list[int]]) -> float:
        start = time.perf_counter()
        RunningBatch(model, pad, share_prefix=False).admit(batch_prompts)
        return 1000 * (time.perf_counter() - start)

    step: dict[int, list[float]] = {n: [] for n in rows}
    batches = {n: batch_of(n) for n in rows}
    for _ in range(repeats):  # round robin, so a slow moment of the machine hits every size alike
        for n, (batch, ids) in batches.items():
            step[n].append(decode_ms(batch, ids, []))
    step_ms, row_ms = fit_line(list(step), [statistics.median(v) for v in step.values()])
    base, joins = rows[len(rows) // 2], []
    for i in range(repeats):  # each join paired with a plain step of the same batch just before it
        batch, ids = batch_of(base)
        prompt = prompts[i % len(prompts)] + prompts[(i + 1) % len(prompts)]
        plain = decode_ms(batch, ids, [])
        joins.append((decode_ms(batch, ids, [prompt]) - plain - row_ms) / len(prompt))
    prefill = {}
    for n in (1, max(rows) // 2, max(rows)):
        batch_prompts = [prompts[i % len(prompts)] for i in range(n)]
        prefill[sum(map(len, batch_prompts))] = statistics.median(prefill_time(batch_prompts) for _ in range(repeats))
    prefill_ms, prefill_token_ms = fit_line(list(prefill), list(prefill.values()))
    return Costs(step_ms, row_ms, max(0.0, statistics.median(joins)), max(0.0, prefill_ms), prefill_token_ms)


class VirtualClock:
    """Seconds that move only when a costed pass runs or the driver jumps to the next event."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class CostedBatch:
    """Stands in for :class:`~serve.kv_batch.RunningBatch`: keeps the row count, charges each pass to the clock."""

    def __init__(self, costs: Costs, clock: VirtualClock, vocab: int):
        self.costs, self.clock, self.vocab, self.rows = costs, clock, vocab, 0

    def _logits(self, n: int) -> torch.Tensor:
        return torch.zeros(n, self.vocab)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        self.clock.t += (self.costs.step_ms + self.costs.row_ms * self.rows) / 1000
        return self._logits(self.rows)

    def admit(self, prompts: list[list[int]]) -> torch.Tensor:
        tokens = sum(map(len, prompts))
        self.clock.t += (self.costs.prefill_ms + self.costs.prefill_token_ms * tokens) / 1000
        self.rows += len(prompts)
        return self._logits(len(prompts))

    def step_and_admit(self, next_ids: torch.Tensor, prompts: list[list[int]]) -> torch.Tensor:
        self.rows += len(prompts)
        self.clock.t += (
            self.costs.step_ms + self.costs.row_ms * self.rows + self.costs.join_token_ms * sum(map(len, prompts))
        ) / 1000
        return self._logits(self.rows)

    def keep(self, rows: list[int]) -> None:
        self.rows = len(rows)


@dataclass
class Served:
    """Per-request timelines of one simulated run."""

    latency: list[float]
    ttft: list[float]
    duration: float
    """Virtual seconds from 0 to the last completion."""
    row_steps: int
    steps: int

    def summary(self) -> dict:
        lat = sorted(self.latency)
        return {
            "requests": len(lat),
            "req_s": len(lat) / self.duration,
            "p50_s": lat[len(lat) // 2],
            "p99_s": lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)],
            "mean_ttft_s": statistics.fmean(self.ttft),
            "mean_rows": self.row_steps / max(self.steps, 1),
        }


class Replica:
    """One replica's scheduler on a virtual clock, fed requests of fixed prompt and completion lengths."""

    def __init__(self, engine: GenerationEngine, costs: Costs, mode: str, args: argparse.Namespace):
        self.clock, self.engine, self.args = VirtualClock(), engine, args
        self.scheduler = Scheduler(
            engine, args.max_batch, 10**6, mode=mode, batch_wait_s=args.batch_wait, clock=self.clock
        )
        self.scheduler.batch = CostedBatch(costs, self.clock, len(engine.tokenizer))
        self.prompt = list(range(3, 3 + args.prompt_tokens))
        self.served = Served([], [], 0.0, 0, 0)
        self.submitted = 0
        self.lengths = random.Random(args.length_seed)

    def submit(self, arrived: float, on_end=None) -> None:
        spread = self.args.tokens_spread
        tokens = self.args.tokens + (self.lengths.randint(-spread, spread) if spread else 0)
        job = self.engine.make_job(self.prompt, tokens, temperature=1.0, seed=self.submitted, ignore_eos=True)
        self.submitted += 1

        request = Request([job], lambda item: None, arrived=arrived)

        def emit(item) -> None:
            if item is None:
                self.served.latency.append(self.clock.t - request.arrived)
                self.served.duration = self.clock.t  # the last completion's time
                self.served.ttft.append(request.first_token - request.arrived)
                if on_end is not None:
                    on_end(self.clock.t)

        request.emit = emit
        self.scheduler.submit(request)

    def idle_until(self, next_event: float) -> None:
        """Move the clock to the next arrival, or to the end of static's batch wait if that comes first."""
        delay = self.scheduler.admit_delay(self.clock.t)
        self.clock.t = next_event if not delay else min(next_event, self.clock.t + delay)

    def run(self, arrivals: list[float]) -> Served:
        """Submit requests at these (sorted) times and run the loop until every one has ended."""
        i = 0
        while True:
            while i < len(arrivals) and arrivals[i] <= self.clock.t:
                self.submit(arrivals[i])
                i += 1
            if self.scheduler.run_once():
                continue
            if i == len(arrivals) and not self.scheduler.waiting:
                return self.finish()
            self.idle_until(arrivals[i] if i < len(arrivals) else math.inf)

    def finish(self) -> Served:
        """The timelines so far, with the loop's step counts."""
        c = self.scheduler.counts
        self.served.row_steps, self.served.steps = c.row_steps, c.steps
        return self.served


def poisson(engine, costs: Costs, mode: str, rate: float, seed: int, args) -> Served:
    """Poisson arrivals at ``rate`` for ``args.duration`` virtual seconds; every request runs to its end."""
    rng, arrivals, t = random.Random(seed), [], 0.0
    while (t := t + rng.expovariate(rate)) < args.duration:
        arrivals.append(t)
    return Replica(engine, costs, mode, args).run(arrivals)


def closed_loop(engine, costs: Costs, mode: str, args) -> float:
    """Requests/s with ``args.clients`` clients that each send the next request ``args.rtt_ms`` after the last ended."""
    replica, due = Replica(engine, costs, mode, args), [0.0] * args.clients
    horizon = args.warmup + args.duration
    ends: list[float] = []

    def ended(t: float) -> None:
        ends.append(t)
        due.append(t + args.rtt_ms / 1000)

    while replica.clock.t < horizon:
        for t in sorted(d for d in due if d <= replica.clock.t):
            due.remove(t)
            replica.submit(t, ended)
        if not replica.scheduler.run_once():
            replica.idle_until(min(due, default=math.inf))
    return sum(args.warmup <= t < horizon for t in ends) / args.duration


def spread(values: list[float]) -> dict:
    """Median and the 10th and 90th percentiles."""
    xs = sorted(values)
    return {
        "median": statistics.median(xs),
        "p10": xs[int(0.1 * (len(xs) - 1))],
        "p90": xs[math.ceil(0.9 * (len(xs) - 1))],
    }


def scenario(engine, costs: Costs, args) -> dict:
    """Capacity, the Poisson rate, and each seed's continuous/static ratios under these costs."""
    capacity = {mode: closed_loop(engine, costs, mode, args) for mode in MODES}
    rate = args.load * capacity["static"]
    runs = {
        mode: [poisson(engine, costs, mode, rate, seed, args).summary() for seed in range(args.seeds)] for mode in MODES
    }
    ratio = {
        key: spread([c[key] / s[key] for c, s in zip(runs["continuous"], runs["static"])])
        for key in ("p99_s", "mean_ttft_s", "req_s")
    }
    return {
        "costs": asdict(costs),
        "closed_loop_req_s": capacity,
        "closed_loop_ratio": capacity["continuous"] / capacity["static"],
        "rate": rate,
        "ratios": ratio,
        "means": {mode: {k: statistics.fmean(r[k] for r in runs[mode]) for k in runs[mode][0]} for mode in MODES},
    }


def report(name: str, result: dict) -> None:
    c, r = result["costs"], result["ratios"]
    print(
        f"\n{name}: step {c['step_ms']:.1f} + {c['row_ms']:.2f}/row ms, join {c['join_token_ms']:.2f} ms/prompt token,"
    )
    print(f"  prefill {c['prefill_ms']:.1f} + {c['prefill_token_ms']:.2f}/token ms")
    cap = result["closed_loop_req_s"]
    print(
        f"  closed loop: continuous {cap['continuous']:.2f}, static {cap['static']:.2f} req/s "
        f"({result['closed_loop_ratio']:.2f}x); Poisson at {result['rate']:.2f} req/s"
    )
    for mode, m in result["means"].items():
        print(
            f"  {mode:<10} p50 {m['p50_s']:.2f} s, p99 {m['p99_s']:.2f} s, TTFT {m['mean_ttft_s']:.2f} s, "
            f"{m['mean_rows']:.1f} rows/step (means over seeds)"
        )
    for key, label in (("p99_s", "p99 latency"), ("mean_ttft_s", "mean TTFT"), ("req_s", "throughput")):
        print(f"  continuous/static {label}: {r[key]['median']:.2f}x (10-90%: {r[key]['p10']:.2f}-{r[key]['p90']:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model whose passes are timed ('tiny' for a smoke run)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 12, 16], help="batch sizes the step cost is fit on")
    p.add_argument("--max-batch", type=int, default=16, help="serve.max_batch_size of both modes")
    p.add_argument("--batch-wait", type=float, default=0.1, help="static's serve.batch_wait_timeout_s")
    p.add_argument("--tokens", type=int, default=32, help="completion tokens per request (fixed, as ignore_eos)")
    p.add_argument(
        "--tokens-spread",
        type=int,
        default=0,
        help="completion lengths uniform in tokens +- this (0: all alike, as the live bench's ignore_eos)",
    )
    p.add_argument("--prompt-tokens", type=int, default=9, help="prompt tokens per request (the live bench's: 7-10)")
    p.add_argument("--clients", type=int, default=16, help="closed-loop clients for the capacity")
    p.add_argument(
        "--rtt-ms", type=float, default=10.0, help="client round trip between a response and the next request"
    )
    p.add_argument("--load", type=float, default=0.7, help="Poisson rate as a share of static's closed-loop req/s")
    p.add_argument("--duration", type=float, default=180.0, help="virtual seconds of arrivals per run")
    p.add_argument("--warmup", type=float, default=10.0, help="closed loop: virtual seconds not counted")
    p.add_argument("--seeds", type=int, default=20, help="arrival seeds per scenario")
    p.add_argument("--dtype", default="float32", help="serve.dtype the passes are timed in")
    p.add_argument("--costs", help="JSON of Costs to use instead of measuring")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.costs:
        costs = Costs(**json.loads(Path(args.costs).read_text()))
    else:
        costs = measure_costs(*load_policy(ModelSettings(policy=args.model), args.dtype), args.rows)
    tiny_model, tiny_tok = tiny.causal_lm(vocab_size=len(tiny.tokenizer()))
    args.length_seed = 0  # the same sequence of completion lengths in every run
    engine = GenerationEngine(tiny_model, tiny_tok, max_tokens_limit=args.tokens + args.tokens_spread)
    results = {
        "measured": scenario(engine, costs, args),
        "joins free": scenario(engine, replace(costs, join_token_ms=0.0), args),
    }
    print(
        f"\n{args.seeds} seeds x {args.duration:.0f} virtual s, {args.max_batch} rows, {args.tokens} +- {args.tokens_spread}-token completions"
    )
    for name, result in results.items():
        report(name, result)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), **results}, indent=2))


if __name__ == "__main__":
    main()
