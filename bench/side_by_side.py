"""Side by side with TRL: TRL 1.16 GRPO and alignray's grpo, gae and rloo on the same task and budget.

One after another (never in parallel), each run trains on the same policy, train prompts, chat
formatting, reward model, response length, number of responses, group size (for the group
estimators), learning rate and KL coefficient (fixed: ``ppo.kl_target=0``, as TRL's ``beta``),
temperature 1 with no top-k/top-p, the same seed and torch threads; then ``alignray eval``
measures every trained policy the same way against the reference on the held-out prompts (gold
gain, KL to the reference, distinct-2). Runs:

| run | what |
|---|---|
| ``trl_grpo`` | ``bench/trl_grpo.py``: TRL's ``GRPOTrainer``, k3 KL times the importance ratio in the loss (TRL's only placement) |
| ``alignray_grpo`` | ``alignray train``: ``ppo.advantage_estimator=grpo ppo.group_size=K ppo.kl_in=loss ppo.kl_estimator=k2`` (the same KL gradient as TRL's at ratio 1) |
| ``alignray_gae`` | ``ppo.advantage_estimator=gae`` (PPO with the critic, one response per prompt) |
| ``alignray_rloo`` | ``ppo.advantage_estimator=rloo ppo.group_size=K`` |
| ``alignray_ppo`` | today's recipe with no new keys (not run by default; ``--runs`` adds it) |

Speed is the training loop's own wall time (TRL: ``train()`` from its first to its last step;
alignray: the sum of ``time_s`` in ``metrics.csv``), so model loading and Ray start-up count for
neither; each process's whole wall time is reported too. Every heavy subprocess (reward-model
training, each training run, each evaluation) holds ``--lock`` (default ``/work/heavy.lock``, the
same flock(2) lock that ``flock /work/heavy.lock CMD`` takes) while it runs, so runs never
overlap each other or other heavy jobs on a shared machine; time spent waiting for it is not
measured. Without a trained reward model at ``reward_model.path`` it is trained first
(``alignray train-rm``). Run it in the bench environment (TRL is not an alignray dependency)::

    make bench-trl-env                                                   # once: .venv-bench/ with TRL 1.16
    .venv-bench/bin/python bench/side_by_side.py --lr 2.5e-5 --kl-coef 0.05   # SmolLM2, ~40 min on 2 cores
    .venv-bench/bin/python bench/side_by_side.py --tiny                  # smoke test on the tiny models

Writes ``side_by_side.json``, ``side_by_side.md`` and ``side_by_side.png`` (gold gain against KL)
to ``--out`` (``bench/results``; ``runs/bench_tiny`` with ``--tiny``) and the runs under
``runs/bench/`` (``runs/bench_tiny/``), each with its ``bench.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.config import load_config  # noqa: E402
from cluster.run_log import read_metrics  # noqa: E402
from envs.data import resolve_path  # noqa: E402
from envs.reward_model import META_FILE  # noqa: E402

BIN = Path(sys.executable).parent  # the bench venv's python and alignray: one set of library versions for all


@dataclass
class Run:
    """One contender: how it trains and the overrides that make it what it is ('{k}' = the group size)."""

    name: str
    label: str
    kind: str  # 'trl' or 'alignray'
    overrides: list[str] = field(default_factory=list)


RUNS = {
    r.name: r
    for r in (
        Run("trl_grpo", "TRL GRPO", "trl"),
        Run(
            "alignray_grpo",
            "alignray grpo",
            "alignray",
            ["ppo.advantage_estimator=grpo", "ppo.group_size={k}", "ppo.kl_in=loss", "ppo.kl_estimator=k2"],
        ),
        Run("alignray_gae", "alignray gae (PPO)", "alignray", ["ppo.advantage_estimator=gae"]),
        Run("alignray_rloo", "alignray rloo", "alignray", ["ppo.advantage_estimator=rloo", "ppo.group_size={k}"]),
        Run("alignray_ppo", "alignray PPO (today's recipe)", "alignray"),
    )
}
DEFAULT_RUNS = "trl_grpo,alignray_grpo,alignray_gae,alignray_rloo"
BUDGETS = {
    # the demo budget: 10 iterations x 32 responses (4 prompts x 8), 24 tokens, minibatches of 16, one epoch
    "demo": {"group_size": 8, "iterations": 10, "responses": 32, "minibatch": 16, "epochs": 1, "max_new_tokens": 24},
    "tiny": {"group_size": 4, "iterations": 2, "responses": 8, "minibatch": 4, "epochs": 1, "max_new_tokens": 6},
}


def log(msg: str) -> None:
    """A progress line with the time of day."""
    print(f"[side_by_side {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextlib.contextmanager
def heavy_lock(path: str):
    """Hold the shared heavy-work lock (flock(2), as `flock PATH cmd` does); no-op for an empty path."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for {path} (another heavy job holds it)")
            t0 = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            log(f"got {path} after {time.perf_counter() - t0:.0f}s")
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_logged(cmd: list[str], log_path: Path, lock: str, threads: int) -> tuple[int, float]:
    """Run `cmd` from the repo root under the lock, echoing its output and appending it to `log_path`."""
    env = os.environ | {
        "OMP_NUM_THREADS": str(threads),  # every side gets the same thread budget, whatever it forks
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    log("$ " + " ".join(cmd))
    with heavy_lock(lock), log_path.open("ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            out.write(chunk)
        return proc.wait(), time.perf_counter() - t0


def tail(path: Path, lines: int = 6) -> str:
    """The last lines of a log, without progress-bar redraws."""
    text = path.read_text(errors="replace").replace("\r", "\n") if path.exists() else ""
    return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])


def train_command(run: Run, a: argparse.Namespace, common: list[str], out: Path) -> list[str]:
    """The training command of a run."""
    extra = [kv for name, kv in a.override if name == run.name]
    if run.kind == "trl":  # trl_grpo.py reads the same preset and overrides as alignray
        trl = [str(BIN / "python"), str(REPO / "bench" / "trl_grpo.py"), a.preset, *common, *extra]
        return [*trl, "--group-size", str(a.group_size), "--out", str(out)]
    own = [o.format(k=a.group_size) for o in run.overrides]
    return [str(BIN / "alignray"), "train", a.preset, *common, *own, *extra, f"run.output_dir={out}"]


def _div(a: float | None, b: float | None) -> float:
    """a / b, NaN when either is missing or b is 0."""
    return a / b if a is not None and b else math.nan


def speed(run: Run, out: Path) -> dict:
    """Responses, training seconds and their rates, and the sampling/update split, from a run's own logs."""
    if run.kind == "trl":
        m = json.loads((out / "trl_metrics.json").read_text())
        responses, seconds = m["responses"], m["train_seconds"]
        stages = {"sampling_seconds": m["generation_seconds"], "update_seconds": m["update_seconds"]}
    else:
        rows = read_metrics(out / "metrics.csv")
        responses, seconds = sum(r["episodes"] for r in rows), sum(r["time_s"] for r in rows)
        # sampling = the EnvRunners' timer, update = the Learner's (the rest is RLlib's bookkeeping)
        sampling = sum(_div(r.get("tokens"), r.get("rollout_tokens_per_s")) for r in rows)
        update = sum(_div(r.get("tokens"), r.get("learner_tokens_per_s")) for r in rows)
        stages = {"sampling_seconds": sampling, "update_seconds": update}
    return {
        "responses": int(responses),
        "train_seconds": seconds,
        "responses_per_s": _div(responses, seconds),
        "seconds_per_1000_responses": _div(1000 * seconds, responses),
        **stages,
    }


def quality(eval_dir: Path) -> dict:
    """Gold gain (and its standard error), KL, distinct-2 and RM score of a policy from its ``summary.json``."""
    s = json.loads((eval_dir / "summary.json").read_text())
    pol, ref = s["policy_metrics"], s["reference_metrics"]
    return {
        "gold_gain": s["gold_gain"],
        "gold_gain_sem": math.hypot(pol["gold_score_sem"], ref["gold_score_sem"]),
        "gold_score": pol["gold_score"],
        "kl": pol["kl"],
        "distinct_2": pol["distinct_2"],
        "rm_score": pol["rm_score"],
        "reference": ref,
        "eval_prompts": s["prompts"],
    }


def one_run(run: Run, a: argparse.Namespace, common: list[str]) -> dict:
    """Train one contender, evaluate its policy, and collect its numbers (or why it failed)."""
    out = a.runs_dir / run.name
    shutil.rmtree(out, ignore_errors=True)  # a run starts clean: no stale metrics, checkpoints or policy
    out.mkdir(parents=True)
    logfile = out / "bench.log"
    result: dict = {"name": run.name, "label": run.label, "kind": run.kind, "run_dir": str(out)}
    cmd = train_command(run, a, common, out)
    result["train_command"] = " ".join(cmd)
    log(f"{run.name}: training")
    code, wall = run_logged(cmd, logfile, a.lock, a.threads)
    result["train_process_seconds"] = wall
    if code != 0:
        log(f"{run.name}: training FAILED (exit {code}); see {logfile}")
        return result | {"status": f"training failed (exit {code})", "error": tail(logfile)}
    result |= speed(run, out)
    log(f"{run.name}: {result['responses']} responses in {result['train_seconds']:.1f}s; evaluating")
    cmd = [str(BIN / "alignray"), "eval", str(out / "policy"), a.preset, *common, "--out", str(out / "eval")]
    code, wall = run_logged(cmd, logfile, a.lock, a.threads)
    result["eval_process_seconds"] = wall
    if code != 0:
        log(f"{run.name}: evaluation FAILED (exit {code}); see {logfile}")
        return result | {"status": f"evaluation failed (exit {code})", "error": tail(logfile)}
    result |= quality(out / "eval") | {"status": "ok"}
    log(
        f"{run.name}: gold gain {result['gold_gain']:+.3f} at KL {result['kl']:.2f}, distinct-2 {result['distinct_2']:.3f}"
    )
    return result


def common_overrides(a: argparse.Namespace) -> list[str]:
    """The overrides every run shares: the budget, the optimisation, the seed and threads."""
    o = [
        f"ppo.iterations={a.iterations}",
        f"ppo.episodes_per_iteration={a.responses}",
        f"ppo.minibatch_episodes={a.minibatch}",
        f"ppo.epochs={a.epochs}",
        f"ppo.lr={a.lr}",
        f"ppo.kl_coef={a.kl_coef}",
        "ppo.kl_target=0",  # a fixed coefficient, as TRL's beta
        "ppo.temperature=1.0",
        f"env.max_new_tokens={a.max_new_tokens}",
        f"run.seed={a.seed}",
        f"run.torch_threads={a.threads}",
        f"run.checkpoint_every={a.iterations}",  # one checkpoint, at the end (it is outside the timed loop anyway)
    ]
    return o + ([f"run.eval_prompts={a.eval_prompts}"] if a.eval_prompts else [])


def ensure_reward_model(a: argparse.Namespace, common: list[str]) -> None:
    """Train the reward model first if the preset's is missing (a 'tiny' backbone needs none)."""
    rm = load_config(a.preset, common).reward_model
    if rm.backbone == "tiny" or (resolve_path(rm.path) / META_FILE).exists():
        return
    log(f"no reward model at {rm.path}: training it first (alignray train-rm)")
    a.runs_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "alignray"), "train-rm", a.preset, f"run.seed={a.seed}", f"run.torch_threads={a.threads}"]
    code, _ = run_logged(cmd, a.runs_dir / "train_rm.log", a.lock, a.threads)
    if code != 0:
        raise SystemExit(f"side_by_side: reward-model training failed (exit {code}); see {a.runs_dir / 'train_rm.log'}")


def versions() -> dict[str, str]:
    """Versions of the libraries both sides run on (one environment for both)."""
    import ray
    import torch
    import transformers
    import trl

    return {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "ray": ray.__version__, "python": sys.version.split()[0]}  # fmt: skip


def held_equal(a: argparse.Namespace) -> dict:
    """What every run shares (the policy, prompts and reward come from the preset)."""
    cfg = load_config(a.preset, common_overrides(a))
    return {
        "preset": a.preset,
        "policy": cfg.model.policy,
        "reward": dict(cfg.env.reward),
        "reward_model": cfg.reward_model.path,
        "reward_normalization": cfg.env.reward_normalization,
        "instruction": cfg.env.instruction,
        "iterations": a.iterations,
        "responses_per_iteration": a.responses,
        "responses": a.iterations * a.responses,
        "group_size": a.group_size,
        "minibatch_responses": a.minibatch,
        "epochs": a.epochs,
        "max_new_tokens": a.max_new_tokens,
        "lr": a.lr,
        "kl_coef": a.kl_coef,
        "temperature": 1.0,
        "seed": a.seed,
        "torch_threads": a.threads,
        "eval_prompts": cfg.run.eval_prompts,
        "cpus": os.cpu_count(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; budget defaults come from the mode (demo, or tiny with --tiny)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="smoke test: tiny random policy and reward model, 2 iterations")
    p.add_argument("--lr", type=float, help="learning rate of every run (required unless --tiny)")
    p.add_argument("--kl-coef", type=float, help="KL coefficient of every run (required unless --tiny)")
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma-separated, in order, from {', '.join(RUNS)}")
    p.add_argument("--group-size", type=int, help="responses per prompt for grpo/rloo (default 8; tiny 4)")
    p.add_argument("--iterations", type=int, help="iterations (default 10; tiny 2)")
    p.add_argument("--responses", type=int, help="responses per iteration (default 32; tiny 8)")
    p.add_argument("--minibatch", type=int, help="responses per SGD step (default 16; tiny 4)")
    p.add_argument("--epochs", type=int, help="passes over each iteration's responses (default 1)")
    p.add_argument("--max-new-tokens", type=int, help="response length (default 24; tiny 6)")
    p.add_argument("--eval-prompts", type=int, help="held-out prompts for alignray eval (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of every process")
    p.add_argument("--override", nargs=2, action="append", default=[], metavar=("RUN", "KEY=VALUE"),
                   help="an extra alignray override for one run, e.g. --override alignray_gae ppo.group_size=8")  # fmt: skip
    p.add_argument("--lock", default="/work/heavy.lock" if Path("/work").is_dir() else "",
                   help="lock file held by each heavy subprocess ('' = none)")  # fmt: skip
    p.add_argument("--out", type=Path, help="results directory (default bench/results; tiny: runs/bench_tiny)")
    p.add_argument("--runs-dir", type=Path, help="where the runs go (default runs/bench; tiny: runs/bench_tiny)")
    a = p.parse_args(argv)
    a.preset = "tiny" if a.tiny else "demo"
    for key, value in BUDGETS[a.preset].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.lr is None or a.kl_coef is None:
        if not a.tiny:
            p.error("give --lr and --kl-coef (the issue's measurement: --lr 2.5e-5 --kl-coef 0.05)")
        ppo = load_config("tiny").ppo
        a.lr, a.kl_coef = a.lr or ppo.lr, ppo.kl_coef if a.kl_coef is None else a.kl_coef
    a.runs = [r.strip() for r in a.runs.split(",") if r.strip()]
    unknown = [r for r in a.runs + [name for name, _ in a.override] if r not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {unknown}; known: {', '.join(RUNS)}")
    default_dir = REPO / ("runs/bench_tiny" if a.tiny else "runs/bench")
    a.runs_dir = (a.runs_dir or default_dir).resolve()
    a.out = (a.out or (default_dir if a.tiny else REPO / "bench" / "results")).resolve()
    return a


def main(argv: list[str] | None = None) -> int:
    """Run every selected contender in turn, then write the JSON, Markdown and PNG; non-zero if any failed."""
    from side_by_side_report import write_outputs  # beside this file (sys.path[0]): the table and the plot

    a = parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("side_by_side: TRL is not installed here; run it with .venv-bench/bin/python "
                         "(make bench-trl-env creates it)") from None  # fmt: skip
    common = common_overrides(a)
    log(f"{a.preset}: runs {', '.join(a.runs)}; shared overrides: {' '.join(common)}")
    ensure_reward_model(a, common)
    started = time.time()
    results = []
    for name in a.runs:
        results.append(one_run(RUNS[name], a, common))
        write_outputs(a.out, {"held_equal": held_equal(a), "runs": results}, partial=True)
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "minutes": (time.time() - started) / 60,
        "versions": versions(),
        "held_equal": held_equal(a),
        "runs": results,
    }
    paths = write_outputs(a.out, report)
    log("results: " + ", ".join(str(p) for p in paths))
    failed = [r["name"] for r in results if r["status"] != "ok"]
    if failed:
        log(f"failed: {', '.join(failed)} (their bench.log has the reason)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
