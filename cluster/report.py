"""The run report: plots of the training curves and before/after samples, as Markdown + PNG.

Reads ``<run>/metrics.csv`` (one row per PPO iteration) and ``<run>/eval/`` (``summary.json``,
``samples.parquet``) and writes ``<run>/report.md`` with ``<run>/report/*.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from cluster.evaluate import SUMMARY_METRICS, per_criterion_metrics  # noqa: E402
from cluster.run_log import read_metrics  # noqa: E402

# metrics.csv column -> plot title; a missing column is skipped.
CURVES = {
    "rm_score": "reward-model score (normalised)",
    "gold_score": "gold score (VADER compound)",
    "kl_ref": "KL to reference (nats / response)",
    "kl_coef": "KL coefficient",
}


def plot_curves(cols: dict[str, list[float]], out: Path) -> list[Path]:
    """One PNG per training curve plus gold-vs-KL; returns the written files."""
    out.mkdir(parents=True, exist_ok=True)
    x = cols.get("iteration") or list(range(1, len(next(iter(cols.values()), [])) + 1))
    files = []
    for key, title in CURVES.items():
        if key not in cols:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(x, cols[key], marker="o", ms=3, label="measured")
        if key == "kl_ref" and any(v > 0 for v in cols.get("kl_target", [])):
            ax.plot(x, cols["kl_target"], "--", color="gray", label="target (ppo.kl_target)")
            ax.legend(loc="best", fontsize=8)
        ax.set(title=title, xlabel="iteration")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files.append(out / f"{key}.png")
        fig.savefig(files[-1])
        plt.close(fig)
    files += plot_groups(cols, x, out)
    if "kl_ref" in cols and "gold_score" in cols:
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        sc = ax.scatter(cols["kl_ref"], cols["gold_score"], c=x, cmap="viridis", s=18)
        fig.colorbar(sc, ax=ax, label="iteration")
        ax.set(title="gold score against KL", xlabel="KL to reference (nats / response)", ylabel="gold score")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files.append(out / "gold_vs_kl.png")
        fig.savefig(files[-1])
        plt.close(fig)
    return files


GROUPS = {
    "gold.": "gold score per criterion",
    "reward_model.": "reward-model score per criterion (normalised)",
    "multiplier.": "Lagrange multiplier per constraint",
    "constraint.": "constrained part, mean over the window the multiplier is stepped from",
    "constraint_batch.": "constrained part, mean over each iteration's responses",
}
"""metrics.csv column prefix -> title of one plot holding every column of that family."""


def plot_groups(cols: dict[str, list[float]], x: list[float], out: Path) -> list[Path]:
    """One PNG per family of per-criterion columns (gold and reward-model scores, multipliers, constraints)."""
    files = []
    for prefix, title in GROUPS.items():
        keys = sorted(k for k in cols if k.startswith(prefix))
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        for key in keys:
            ax.plot(x, cols[key], marker="o", ms=3, label=key.removeprefix(prefix))
        ax.set(title=title, xlabel="iteration")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        files.append(out / f"{prefix.rstrip('.')}_per_criterion.png")
        fig.savefig(files[-1])
        plt.close(fig)
    return files


def _cell(text: str, width: int = 160) -> str:
    """A Markdown-table-safe, shortened cell."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def samples_table(samples: Path, n: int = 8) -> str:
    """Markdown table of reference vs policy responses to the same held-out prompts."""
    rows = pq.read_table(samples).to_pylist()
    ref = {r["prompt"]: r for r in rows if r["model"] == "reference"}
    pol = [r for r in rows if r["model"] == "policy" and r["prompt"] in ref][:n]
    lines = ["| prompt | reference (gold) | policy (gold, KL) |", "|---|---|---|"]
    for p in pol:
        r = ref[p["prompt"]]
        lines.append(
            f"| {_cell(p['prompt'], 90)} | {_cell(r['response'])} ({r['gold_score']:+.2f}) "
            f"| {_cell(p['response'])} ({p['gold_score']:+.2f}, {p['kl']:.1f}) |"
        )
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Write report.md and its PNGs for a run directory; returns the report path."""
    run = Path(run_dir)
    parts = [f"# alignray run report: `{run}`", ""]
    rows = read_metrics(run / "metrics.csv") if (run / "metrics.csv").exists() else []
    pngs = plot_curves({k: [r[k] for r in rows] for k in rows[0]}, run / "report") if rows else []
    summary_path = run / "eval" / "summary.json"
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        ref, pol = s["reference_metrics"], s["policy_metrics"]
        parts += [
            f"Held-out evaluation on {s['prompts']} prompts: policy `{s['policy']}` against reference "
            f"`{s['reference']}`.",
            "",
            "| metric | reference | policy |",
            "|---|---|---|",
        ]
        parts += [f"| {k} | {ref[k]:.3f} | {pol[k]:.3f} |" for k in [*SUMMARY_METRICS, *per_criterion_metrics(s)]]
        parts += ["", f"Gold-score gain: **{s['gold_gain']:+.3f}** (± {pol['gold_score_sem']:.3f} s.e.)", ""]
        gains = [k.removeprefix("gold_gain.") for k in s if k.startswith("gold_gain.")]
        parts += [
            f"- gold gain, {c}: {s[f'gold_gain.{c}']:+.3f} (± {pol[f'gold_score_sem.{c}']:.3f} s.e.)" for c in gains
        ]
        parts += [""] if gains else []
    parts += ["## Training curves", ""] + [f"![{p.stem}](report/{p.name})" for p in pngs] + [""]
    if (run / "eval" / "samples.parquet").exists():
        parts += [
            "## Before and after: the same held-out prompts",
            "",
            samples_table(run / "eval" / "samples.parquet"),
            "",
        ]
    out = run / "report.md"
    out.write_text("\n".join(parts))
    return out
