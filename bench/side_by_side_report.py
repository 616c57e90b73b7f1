"""The outputs of ``bench/side_by_side.py``: ``side_by_side.json``, a Markdown table and a gold-gain-vs-KL plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

NAME = "side_by_side"
TRL_RUN = "trl_grpo"
GRPO_RUN = "alignray_grpo"


def _f(x, fmt: str) -> str:
    """A number in `fmt`, or a dash when missing."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def speed_vs_trl(runs: list[dict]) -> dict[str, float]:
    """Each finished run's responses/s divided by TRL GRPO's (TRL = 1)."""
    trl = next((r for r in runs if r["name"] == TRL_RUN and "responses_per_s" in r), None)
    if trl is None:
        return {}
    return {r["name"]: r["responses_per_s"] / trl["responses_per_s"] for r in runs if "responses_per_s" in r}


def table(runs: list[dict]) -> list[str]:
    """The Markdown table: speed, then quality measured by ``alignray eval``."""
    ratio = speed_vs_trl(runs)
    lines = [
        "| run | responses | training s | s / 1,000 responses | responses/s | ÷ TRL GRPO | sampling s | "
        "update s | gold gain (± s.e.) | KL (nats) | distinct-2 | RM score | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        gain = f"{_f(r.get('gold_gain'), '+.3f')} ± {_f(r.get('gold_gain_sem'), '.3f')}" if "gold_gain" in r else "–"
        lines.append(
            f"| {r['label']} | {_f(r.get('responses'), 'd')} | {_f(r.get('train_seconds'), '.1f')} "
            f"| {_f(r.get('seconds_per_1000_responses'), '.0f')} | {_f(r.get('responses_per_s'), '.3f')} "
            f"| {_f(ratio.get(r['name']), '.2f')}x | {_f(r.get('sampling_seconds'), '.1f')} "
            f"| {_f(r.get('update_seconds'), '.1f')} | {gain} | {_f(r.get('kl'), '.2f')} "
            f"| {_f(r.get('distinct_2'), '.3f')} | {_f(r.get('rm_score'), '.3f')} | {r['status']} |"
        )
    return lines


def headline(runs: list[dict]) -> list[str]:
    """The issue's speed criterion in one line, both ways round."""
    ratio = speed_vs_trl(runs).get(GRPO_RUN)
    if ratio is None:
        return []
    return [
        f"alignray grpo / TRL GRPO responses/s: **{ratio:.2f}x** (target ≥ 1.3x); TRL GRPO / alignray grpo: "
        f"{1 / ratio:.2f}x.",
        "",
    ]


def markdown(report: dict, partial: bool) -> str:
    """The whole Markdown report."""
    h, runs = report["held_equal"], report["runs"]
    ref = next((r["reference"] for r in runs if "reference" in r), None)
    lines = [f"# Side by side with TRL{' (in progress)' if partial else ''}", ""]
    if "command" in report:
        v = report["versions"]
        lines += [
            f"`{report['command']}` — {report['started']}, {report['minutes']:.1f} min; "
            f"TRL {v['trl']}, transformers {v['transformers']}, torch {v['torch']}, Ray {v['ray']}.",
            "",
        ]
    lines += [
        f"Held equal: policy `{h['policy']}` (preset `{h['preset']}`), reward {h['reward']} from "
        f"`{h['reward_model']}` (normalised: {h['reward_normalization']}), {h['iterations']} iterations x "
        f"{h['responses_per_iteration']} responses = {h['responses']}, groups of {h['group_size']} for grpo/rloo/TRL, "
        f"≤ {h['max_new_tokens']} tokens, minibatches of {h['minibatch_responses']}, {h['epochs']} epoch(s), "
        f"lr {h['lr']}, fixed KL coefficient {h['kl_coef']}, temperature 1, no top-k/top-p, seed {h['seed']}, "
        f"{h['torch_threads']} torch threads on {h['cpus']} CPUs. Quality: `alignray eval` on "
        f"{h['eval_prompts']} held-out prompts.",
        "",
        *table(runs),
        "",
        *headline(runs),
        "Training s: the training loop's own wall time (no model loading or start-up). Sampling s: TRL's "
        "generate-and-score stage (generation, reward, old and reference log-probs) / alignray's EnvRunner "
        "sampling timer; update s: the rest of TRL's steps / alignray's Learner update timer.",
    ]
    if ref:
        lines += [
            "",
            f"Reference model on the same prompts: gold {ref['gold_score']:.3f}, distinct-2 {ref['distinct_2']:.3f}, "
            f"RM score {ref['rm_score']:.3f}.",
        ]
    for r in runs:
        if r["status"] != "ok":
            lines += ["", f"**{r['label']}**: {r['status']}. Last lines of `{r['run_dir']}/bench.log`:", "", "```"]
            lines += [r.get("error", ""), "```"]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    """Gold gain against KL to the reference, one point per evaluated run (the reference at the origin)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.scatter([0], [0], marker="x", color="gray")
    ax.annotate("reference", (0, 0), textcoords="offset points", xytext=(6, -12), fontsize=8, color="gray")
    for r in (r for r in runs if "gold_gain" in r):
        color = "tab:orange" if r["kind"] == "trl" else "tab:blue"
        ax.errorbar(r["kl"], r["gold_gain"], yerr=r["gold_gain_sem"], fmt="o", color=color, capsize=3)
        ax.annotate(r["label"], (r["kl"], r["gold_gain"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("KL to reference (nats / response, held-out)")
    ax.set_ylabel("gold score gain over reference (VADER)")
    ax.set_title("Gold gain against KL at the same budget")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(out_dir: Path, report: dict, partial: bool = False) -> list[Path]:
    """Write ``side_by_side.json``, ``.md`` and ``.png`` to `out_dir`; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{NAME}.{ext}" for ext in ("json", "md", "png")]
    paths[0].write_text(json.dumps(report | {"partial": partial}, indent=2, default=str))
    paths[1].write_text(markdown(report, partial))
    plot(report["runs"], paths[2])
    return paths
