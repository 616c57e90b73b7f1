"""The report across rounds of ``alignray iterate``: one summary per round, a table and a plot of them."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cluster.config import Config  # noqa: E402
from envs.data import (  # noqa: E402
    DEFAULT_CRITERION,
    DataError,
    criterion_of,
    load_preferences,
    preference_pairs,
    resolve_path,
)
from envs.reward_model import RewardModel  # noqa: E402
from envs.reward_training import evaluate_rm  # noqa: E402
from serve.labelling.reports import export_rows, stats  # noqa: E402

HELD_OUT_PAIRS = 200
"""Held-out pairs of ``data.preferences`` the reward model of each round is checked on (gold order)."""
HELD_OUT_CRITERIA = ("positivity", DEFAULT_CRITERION)
"""Rows of ``data.preferences`` whose gold order is the simulated annotator's (VADER of the response)."""


def _held_out_agreement(cfg: Config, rm_dir: Path) -> dict:
    """The round's reward model ('overall' head) on the shipped held-out pairs: agreement with the gold order, Spearman."""
    try:
        rows = load_preferences(resolve_path(cfg.data.preferences), "test")
    except DataError:
        return {}
    rows = [r for r in rows if criterion_of(r) in HELD_OUT_CRITERIA][:HELD_OUT_PAIRS]
    if not rows or "chosen_score" not in rows[0]:
        return {}
    out = evaluate_rm(RewardModel.load(rm_dir), rows, cfg.reward_model.score_batch_size, DEFAULT_CRITERION)
    return {"gold_agreement": out["gold_agreement"], "spearman": out["spearman"], "pairs": out["gold_pairs"]}


def _previous_on_new_labels(cfg: Config, store, k: int, prev_rm: Path) -> float | None:
    """Round k-1's reward model on round k's 'overall' labels, which it never saw: held-out label accuracy."""
    if not (prev_rm / "metrics.json").exists():
        return None
    rows = preference_pairs([r for r in export_rows(store, [k]) if criterion_of(r) == DEFAULT_CRITERION])
    if not rows:
        return None
    return evaluate_rm(RewardModel.load(prev_rm), rows, cfg.reward_model.score_batch_size, DEFAULT_CRITERION)[
        "accuracy"
    ]


def round_summary(
    cfg: Config, store, k: int, ppo_dir: Path, rm_dir: Path, policy_in: str, prev_rm: Path | None = None
) -> dict:
    """What round k did: labels, annotator agreement, reward model (and `prev_rm`, round k-1's), the new policy."""
    rm = json.loads((rm_dir / "metrics.json").read_text())
    ev = json.loads((ppo_dir / "eval" / "summary.json").read_text())
    overall = stats(store)["agreement"].get("overall", {})
    return {
        "round": k,
        "policy_in": policy_in,
        "policy_out": str(ppo_dir / "policy"),
        "labels_round": store.slot_counts(k)["done"],
        "labels_total": sum(store.slot_counts(j)["done"] for j in range(1, k + 1)),
        "annotator_alpha": overall.get("alpha"),
        "rm_train_pairs": rm["train_pairs"],
        "rm_label_accuracy": rm["eval_accuracy"],  # on the last tenth of its own training labels (in-sample)
        "rm_prev_on_new_labels": _previous_on_new_labels(cfg, store, k, prev_rm) if prev_rm else None,
        "rm_warm_start": rm.get("warm_start"),
        "rm_held_out": _held_out_agreement(cfg, rm_dir),
        "gold_reference": ev["reference_metrics"]["gold_score"],
        "gold_policy": ev["policy_metrics"]["gold_score"],
        "gold_sem": ev["policy_metrics"]["gold_score_sem"],
        "kl": ev["policy_metrics"]["kl"],
        "rm_score_policy": ev["policy_metrics"]["rm_score"],
    }


def _fmt(x) -> str:
    return "–" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))


def write_rounds_report(out: Path, rounds: int) -> tuple[Path, list[dict]]:
    """``<out>/report.md`` (and ``report_rounds.png``) over the rounds that have a summary."""
    found = [out / f"round_{k}" / "summary.json" for k in range(1, rounds + 1)]
    summaries = [json.loads(p.read_text()) for p in found if p.exists()]
    lines = [
        f"# alignray iterate: `{out}`",
        "",
        "Held-out gold score and KL are measured against the original reference model; the reward model's",
        "gold agreement is on the held-out pairs of `data.preferences`.",
        "",
        "Label accuracy of the previous round's reward model is on this round's labels, which it never saw (the",
        "reward model's accuracy on the labels it was trained on is in `round_k/reward_model/metrics.json`).",
        "",
        "| round | labels (round / total) | annotator alpha | RM train pairs | prev. RM on new labels | RM gold agreement "
        "| gold: reference | gold: policy | KL | RM score |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['round']} | {s['labels_round']} / {s['labels_total']} | {_fmt(s['annotator_alpha'])} "
            f"| {s['rm_train_pairs']} | {_fmt(s.get('rm_prev_on_new_labels'))} | {_fmt(s['rm_held_out'].get('gold_agreement'))} "
            f"| {_fmt(s['gold_reference'])} | {_fmt(s['gold_policy'])} ± {_fmt(s['gold_sem'])} | {_fmt(s['kl'])} "
            f"| {_fmt(s['rm_score_policy'])} |"
        )
    if summaries:
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        x = [s["round"] for s in summaries]
        ax.errorbar(x, [s["gold_policy"] for s in summaries], yerr=[s["gold_sem"] for s in summaries], marker="o")
        ax.axhline(summaries[0]["gold_reference"], color="grey", ls="--", label="reference")
        ax.set(title="held-out gold score per round", xlabel="round", xticks=x)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "report_rounds.png")
        plt.close(fig)
        lines += ["", "![gold score per round](report_rounds.png)", ""]
        lines += [f"- round {s['round']}: [run report](round_{s['round']}/ppo/report.md)" for s in summaries]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report, summaries
