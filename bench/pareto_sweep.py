"""The positivity/consistency trade-off: PPO at several weightings of two criteria, and the Pareto front.

Each run trains the same preset (``demo``; ``tiny`` with ``--tiny``) with
``env.reward = {<parts>.positivity: w, <parts>.consistency: 1 - w}`` for every ``w`` in ``--weights``
(``<parts>`` is ``reward_model``: the two heads of a reward model trained with
``reward_model.criteria=[positivity, consistency]``; or ``gold``, the gold scores themselves),
plus, with ``--constrained THRESHOLD``, one PPO-Lagrangian run that maximises positivity subject to
``E[consistency] >= THRESHOLD``. ``alignray eval`` then measures every policy on the held-out
prompts; the plot puts each run at its held-out gold positivity and consistency (with standard
errors), the reference among them, and joins the runs on the Pareto front.

One run after another (each training and evaluation holds ``--lock``, the shared heavy-job lock)::

    python bench/pareto_sweep.py --tiny                                   # smoke test, ~2 min of CPU
    python bench/pareto_sweep.py --reward-model runs/rm_criteria \\
        --weights 1 0.75 0.5 0.25 --constrained 0.0                       # SmolLM2: ~15 min per run

A reward model without both heads is trained first (``alignray train-rm``). Writes
``pareto.json`` (every run's command and numbers) and ``pareto.png`` to ``--out``
(``bench/results``; ``runs/pareto_tiny`` with ``--tiny``), and the runs under ``--runs-dir``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from side_by_side import BIN, REPO, log, run_logged, tail  # beside this file (sys.path[0])

from cluster.config import load_config
from envs.data import resolve_path
from envs.reward_model import META_FILE

CRITERIA = ("positivity", "consistency")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better), by the first coordinate."""
    front = [i for i, (x, y) in enumerate(points) if not any(a >= x and b >= y and (a, b) != (x, y) for a, b in points)]
    return sorted(front, key=lambda i: points[i][0])


def runs_of(a: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(name, overrides) of every run: one per weight, then the constrained run if asked for."""
    pos, con = (f"{a.parts}.{c}" for c in CRITERIA)
    out = [(f"w{w:g}", [f"env.reward={{{pos}: {w:g}, {con}: {1 - w:g}}}"]) for w in a.weights]
    if a.constrained is not None:
        out.append(
            (
                f"constrained{a.constrained:g}",
                [f"env.reward={{{pos}: 1.0}}", f"ppo.constraints={{{con}: {a.constrained:g}}}"]
                + ([f"ppo.multiplier_lr={a.multiplier_lr:g}"] if a.multiplier_lr is not None else []),
            )
        )
    return out


def ensure_two_heads(a: argparse.Namespace, common: list[str]) -> None:
    """Train the two-head reward model unless it exists (the gold parts and a 'tiny' backbone need none)."""
    rm = load_config(a.preset, common).reward_model
    if a.parts == "gold" or rm.backbone == "tiny" or (resolve_path(rm.path) / META_FILE).exists():
        return
    log(f"no reward model at {rm.path}: training one with heads {', '.join(CRITERIA)}")
    a.runs_dir.mkdir(parents=True, exist_ok=True)
    code, _ = run_logged([str(BIN / "alignray"), "train-rm", a.preset, *common], a.runs_dir / "train_rm.log", a.lock, 2)
    if code != 0:
        raise SystemExit(f"pareto_sweep: reward-model training failed (exit {code}); see {a.runs_dir / 'train_rm.log'}")


def one_run(name: str, overrides: list[str], a: argparse.Namespace, common: list[str]) -> dict:
    """Train, evaluate, and read back the held-out gold of both criteria (or why it failed)."""
    out = a.runs_dir / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    logfile = out / "bench.log"
    train = [str(BIN / "alignray"), "train", a.preset, *common, *overrides, f"run.output_dir={out}"]
    result = {"name": name, "overrides": overrides, "train_command": " ".join(train)}
    code, result["train_seconds"] = run_logged(train, logfile, a.lock, 2)
    if code == 0:
        evaluate = [str(BIN / "alignray"), "eval", str(out / "policy"), a.preset, *common, "--out", str(out / "eval")]
        code, result["eval_seconds"] = run_logged(evaluate, logfile, a.lock, 2)
    if code != 0:
        log(f"{name}: FAILED (exit {code}); see {logfile}")
        return result | {"status": f"failed (exit {code})", "error": tail(logfile)}
    s = json.loads((out / "eval" / "summary.json").read_text())
    for side in ("policy", "reference"):
        m = s[f"{side}_metrics"]
        result[side] = {"kl": m["kl"]} | {
            k: m[f"{g}.{c}"] for c in CRITERIA for g in ("gold_score", "gold_score_sem") for k in [f"{g}.{c}"]
        }
    log(f"{name}: " + ", ".join(f"{c} {result['policy'][f'gold_score.{c}']:.3f}" for c in CRITERIA))
    return result | {"status": "ok"}


def plot(results: list[dict], path: Path) -> None:
    """Held-out gold positivity against consistency, the reference and the Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    points = [(r["policy"]["gold_score.positivity"], r["policy"]["gold_score.consistency"]) for r in ok]
    for r, (x, y) in zip(ok, points):
        p = r["policy"]
        ax.errorbar(x, y, xerr=p["gold_score_sem.positivity"], yerr=p["gold_score_sem.consistency"], fmt="o")
        ax.annotate(f"{r['name']} (KL {p['kl']:.1f})", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if ok:
        ref = ok[0]["reference"]
        ax.plot(ref["gold_score.positivity"], ref["gold_score.consistency"], "k*", ms=12, label="reference")
        front = pareto_front(points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "r--", label="Pareto front")
    ax.set_xlabel("held-out gold positivity")
    ax.set_ylabel("held-out gold consistency")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="smoke test on the tiny preset")
    p.add_argument("--weights", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25], help="positivity weights w")
    p.add_argument("--parts", choices=("reward_model", "gold"), default="reward_model", help="what is weighted")
    p.add_argument("--reward-model", help="two-head reward model directory (default: the preset's path)")
    p.add_argument("--constrained", type=float, help="also one constrained run: consistency >= this threshold")
    p.add_argument(
        "--multiplier-lr", type=float, help="the constrained run's ppo.multiplier_lr (default: the config's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lock", default="/work/heavy.lock" if Path("/work").is_dir() else "",
                   help="lock file held by each heavy subprocess ('' = none)")  # fmt: skip
    p.add_argument("--out", type=Path, help="results directory (default bench/results; tiny: runs/pareto_tiny)")
    p.add_argument("--runs-dir", type=Path, help="where the runs go (default runs/pareto; tiny: runs/pareto_tiny)")
    a = p.parse_args(argv)
    if any(not 0 <= w <= 1 for w in a.weights):
        p.error("--weights must lie in [0, 1] (w for positivity, 1 - w for consistency)")
    a.preset = "tiny" if a.tiny else "demo"
    default_dir = REPO / ("runs/pareto_tiny" if a.tiny else "runs/pareto")
    a.runs_dir = (a.runs_dir or default_dir).resolve()
    a.out = (a.out or (default_dir if a.tiny else REPO / "bench" / "results")).resolve()
    return a


def main(argv: list[str] | None = None) -> int:
    """Every run in turn, then pareto.json and pareto.png; non-zero if any run failed."""
    a = parse_args(argv)
    common = [f"run.seed={a.seed}", f"reward_model.criteria=[{', '.join(CRITERIA)}]"]
    common += [f"reward_model.path={a.reward_model}"] if a.reward_model else []
    ensure_two_heads(a, common)
    started, results = time.time(), []
    a.out.mkdir(parents=True, exist_ok=True)
    for name, overrides in runs_of(a):
        results.append(one_run(name, overrides, a, common))
        report = {"command": " ".join(sys.argv), "started": started, "preset": a.preset, "runs": results}
        (a.out / "pareto.json").write_text(json.dumps(report, indent=2))
        plot(results, a.out / "pareto.png")
    log(f"results: {a.out / 'pareto.json'}, {a.out / 'pareto.png'} ({(time.time() - started) / 60:.1f} min)")
    return 1 if any(r["status"] != "ok" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
