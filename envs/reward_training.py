"""Training the reward model on preference pairs with the Bradley-Terry loss, one head per criterion.

``train_reward_model(settings, preferences)`` trains ``RewardModel`` on the train split of a
preference file, evaluates on the test split, and writes the model directory and ``metrics.json``
to ``settings.path``. Every criterion of the file (or ``settings.criteria``) gets a head trained
on that criterion's rows only; a step's batch holds whole compared pairs with each of their
labels, so a response is encoded once for every head and pair that reads it, and a head whose
criterion has no row in the batch gets no gradient. Evaluation, per criterion, reports pairwise
accuracy against the annotator's labels, agreement with the noise-free gold ordering (pairs whose
gold scores differ), and the Spearman correlation of scores with gold scores over the held-out
responses. ``metrics.json`` keeps them under ``criteria[<name>]``, and the first criterion's at
the top level as single-criterion files always had.

The file may be one ``alignray label export`` wrote: ties and "both bad" rows are skipped, as they
have no order for the Bradley-Terry loss (``envs.data.preference_pairs``); a file without a
``criterion`` column is one criterion, ``overall``. ``warm_start`` starts from a trained
reward-model directory (its encoder, heads and text settings; a criterion it has no head for gets
a fresh one) instead of fresh heads, as iterated rounds do.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from envs.data import DEFAULT_CRITERION, DataError, criterion_of, load_preferences
from envs.reward_model import RewardModel, RewardModelSettings
from envs.stats import pairwise_agreement, spearman

NORM_SAMPLE = 2000
"""Distinct training responses whose scores give each head's normalisation mean and std."""


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected) over the batch; inputs (B,)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def training_criteria(rows: list[dict], wanted: list[str], path: str | Path) -> list[str]:
    """The heads to train: `wanted`, else every criterion with a non-tie pair ('overall' first, then as they appear)."""
    present = list(dict.fromkeys(criterion_of(r) for r in rows))
    ordered = wanted or sorted(present, key=lambda c: c != DEFAULT_CRITERION)  # stable: appearance order kept
    with_pairs = {criterion_of(r) for r in rows if not r.get("tie", False)}
    if wanted:
        missing = [c for c in wanted if c not in with_pairs]
        if missing:
            raise DataError(f"{path}: no {missing[0]!r} preference pairs to train on (criteria in the file: {present})")
    kept = [c for c in ordered if c in with_pairs]
    if not kept:
        raise DataError(
            f"{path}: no {' or '.join(map(repr, present))} preference pairs to train on (every row is a tie)"
        )
    return kept


def prompt_batches(rows: list[dict], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Row indices of each step: prompt groups in random order, cut into batches of batch_size compared pairs.

    A compared pair's labels of different criteria travel together (one item), and a prompt's
    pairs stay next to each other, so each response is encoded once for all its pairs and heads
    in a step (a prompt group straddles at most two steps). One criterion: an item is one row.
    """
    groups: dict[str, dict[tuple, list[int]]] = {}
    seen: dict[tuple, int] = {}
    for i, r in enumerate(rows):
        pair = (r["prompt"], *sorted([r.get("chosen") or "", r.get("rejected") or ""]))
        nth = seen.get((*pair, criterion_of(r)), 0)  # the n-th label of a pair by one criterion joins item n
        seen[(*pair, criterion_of(r))] = nth + 1
        groups.setdefault(r["prompt"], {}).setdefault((*pair, nth), []).append(i)
    keys = list(groups)
    rng.shuffle(keys)
    items: list[list[int]] = []
    for k in keys:
        members = list(groups[k].values())
        rng.shuffle(members)
        items += members
    return [[i for item in items[j : j + batch_size] for i in item] for j in range(0, len(items), batch_size)]


def _pair_scores(rm: RewardModel, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B,) of the chosen and rejected responses, each by its row's criterion head, in one encoder pass.

    The pass covers the batch's distinct texts, plus the distinct prompts of rows whose head reads
    the prompt; a response compared k times (by any criterion) is encoded once.
    """
    n = len(rows)
    prompts = [r["prompt"] for r in rows]
    crits = [criterion_of(r) for r in rows]
    texts = rm.texts([r["chosen"] for r in rows], prompts) + rm.texts([r["rejected"] for r in rows], prompts)
    distinct = list(dict.fromkeys(texts))
    distinct_prompts = list(dict.fromkeys(p for p, c in zip(prompts, crits) if c in rm.prompt_heads))
    enc = rm.encode(distinct + distinct_prompts)
    pooled = rm.pool(enc["input_ids"], enc["attention_mask"])  # (texts + prompts, H)
    where = {t: i for i, t in enumerate(distinct)}
    where_p = {p: len(distinct) + i for i, p in enumerate(distinct_prompts)}
    e_text = pooled[torch.tensor([where[t] for t in texts])]  # (2B, H): chosen then rejected
    parts, order = [], []
    for c in dict.fromkeys(crits):
        idx = [i for i in range(n) if crits[i] == c]
        sel = torch.tensor(idx + [i + n for i in idx])
        e_p = pooled[torch.tensor([where_p[prompts[i]] for i in idx] * 2)] if c in rm.prompt_heads else None
        parts.append(rm.head_scores(c, e_text[sel], e_p))
        order.append(sel)
    scores = torch.cat(parts)[torch.argsort(torch.cat(order))]  # (2B,) back in row order
    return scores[:n], scores[n:]


def _metrics(sc: np.ndarray, sr: np.ndarray, rows: list[dict]) -> dict[str, float]:
    """Label accuracy, gold-order agreement and Spearman vs gold from chosen/rejected scores of rows."""
    out = {"accuracy": float((sc > sr).mean()), "pairs": len(rows)}
    if "chosen_score" in rows[0]:
        gc = np.array([r["chosen_score"] for r in rows])
        gr = np.array([r["rejected_score"] for r in rows])
        out["gold_agreement"], out["gold_pairs"] = pairwise_agreement(sc, sr, gc, gr)
        out["spearman"] = spearman(np.concatenate([sc, sr]), np.concatenate([gc, gr]))
    return out


def evaluate_rm(rm: RewardModel, rows: list[dict], batch_size: int = 64, criterion: str | None = None) -> dict:
    """Label accuracy, gold-order agreement and Spearman vs gold on preference rows, by one head (None = the first)."""
    c = rm.head_name(criterion)
    return evaluate_criteria(rm, {c: rows}, batch_size)[c]


def evaluate_criteria(rm: RewardModel, rows: dict[str, list[dict]], batch_size: int = 64) -> dict[str, dict]:
    """:func:`evaluate_rm` of each head on its own rows, scoring every distinct (prompt, response) once for all heads."""
    keys = list(dict.fromkeys((r["prompt"], r[k]) for rs in rows.values() for r in rs for k in ("chosen", "rejected")))
    scores = rm.score_all([t for _, t in keys], [p for p, _ in keys], batch_size, criteria=list(rows))
    at = {key: i for i, key in enumerate(keys)}
    out = {}
    for c, rs in rows.items():
        sc = np.array([scores[c][at[(r["prompt"], r["chosen"])]] for r in rs])
        sr = np.array([scores[c][at[(r["prompt"], r["rejected"])]] for r in rs])
        out[c] = _metrics(sc, sr, rs)
    return out


def train_step(rm: RewardModel, opt: torch.optim.Optimizer, rows: list[dict]) -> float:
    """One optimizer step on a batch of labelled rows (any criteria); returns the Bradley-Terry loss.

    Every label weighs the same. A head whose criterion has no row in the batch is not in the
    graph: its gradient stays None, so the optimizer leaves it (and its Adam moments) untouched.
    """
    r_c, r_r = _pair_scores(rm, rows)
    loss = bradley_terry_loss(r_c, r_r)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
    opt.step()
    return loss.item()


def _fit(rm: RewardModel, rows: list[dict], rc: RewardModelSettings, seed: int) -> list[float]:
    """Run the optimisation loop with a progress bar; returns the per-step losses (mean over the batch's labels)."""
    opt = torch.optim.AdamW(rm.parameters(), lr=rc.lr, weight_decay=0.01, fused=True)
    rng = random.Random(seed)
    epochs = [prompt_batches(rows, rc.batch_size, rng) for _ in range(rc.epochs)]
    steps = sum(map(len, epochs))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    losses: list[float] = []
    rm.train()
    with tqdm(total=steps, desc="reward model", unit="step") as bar:
        for batches in epochs:
            for indices in batches:
                losses.append(train_step(rm, opt, [rows[j] for j in indices]))
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    rm.eval()
    return losses


def _split_rows(pref_path: str | Path, rc: RewardModelSettings) -> tuple[list[str], list[dict], dict[str, list[dict]]]:
    """(criteria, train rows in file order, held-out rows per criterion); ties skipped, max_pairs per criterion."""
    all_rows = load_preferences(pref_path, None)
    train_all = [r for r in all_rows if r.get("split", "train") == "train"]
    if not train_all:
        raise DataError(f"{pref_path}: no rows in split 'train'")
    criteria = training_criteria(train_all, rc.criteria, pref_path)
    keep: set[int] = set()
    test = {}
    for c in criteria:
        mine = [i for i, r in enumerate(train_all) if criterion_of(r) == c and not r.get("tie", False)]
        mine = mine[: rc.max_pairs or None]
        keep.update(mine)
        held = [r for r in all_rows if r.get("split") == "test" and criterion_of(r) == c and not r.get("tie", False)]
        test[c] = held or [train_all[i] for i in mine[-max(1, len(mine) // 10) :]]  # no test split: a train slice
    return criteria, [r for i, r in enumerate(train_all) if i in keep], test


def _norm_stats(rm: RewardModel, rows: list[dict], batch_size: int, seed: int) -> None:
    """Set each head's normalisation mean/std from distinct training responses drawn from every prompt."""
    # Rows are grouped by prompt, so the first rows would cover only a few prompts: sample instead.
    distinct = sorted({(r[k], r["prompt"]) for r in rows for k in ("chosen", "rejected")})
    sample = random.Random(seed).sample(distinct, min(NORM_SAMPLE, len(distinct)))
    scores = rm.score_all([t for t, _ in sample], [p for _, p in sample], batch_size=batch_size)
    rm.stats.update({c: (float(np.mean(s)), float(np.std(s) or 1.0)) for c, s in scores.items()})


def train_reward_model(
    rc: RewardModelSettings, pref_path: str | Path, seed: int = 0, warm_start: str | Path | None = None
) -> dict:
    """Train (from `warm_start`'s weights if given), evaluate and save the reward model; returns the metrics."""
    torch.manual_seed(seed)
    criteria, train_rows, test_rows = _split_rows(pref_path, rc)
    if warm_start:
        rm = RewardModel.load(warm_start)
        rm.add_heads(criteria, rc.prompt_heads)
        rm.order_heads(criteria)
    else:
        rm = RewardModel.untrained(rc, criteria)
    start = time.time()
    before = evaluate_criteria(rm, test_rows, rc.score_batch_size)
    fit_start = time.time()
    losses = _fit(rm, train_rows, rc, seed)
    fit_seconds = time.time() - fit_start
    _norm_stats(rm, train_rows, rc.score_batch_size, seed)
    after = evaluate_criteria(rm, test_rows, rc.score_batch_size)
    out = rm.save(Path(rc.path))
    per = {
        c: {
            "train_pairs": sum(criterion_of(r) == c for r in train_rows),
            "test_pairs": len(test_rows[c]),
            "score_mean": rm.stats[c][0],
            "score_std": rm.stats[c][1],
            **{f"eval_{k}": v for k, v in after[c].items()},
            **{f"untrained_{k}": v for k, v in before[c].items()},
        }
        for c in criteria
    }
    metrics = {
        "path": str(out),
        "backbone": rc.backbone,
        "warm_start": str(warm_start) if warm_start else None,
        "seconds": round(time.time() - start, 1),
        "steps": len(losses),
        "seconds_per_step": round(fit_seconds / max(1, len(losses)), 3),
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-20:])),
        "losses": losses,
        **per[criteria[0]],  # the first head's numbers where single-criterion readers look
        "criteria": per,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def metrics_lines(metrics: dict) -> list[str]:
    """One line per criterion of a ``metrics.json``: held-out label accuracy, gold-order agreement, Spearman."""
    lines = []
    for c, m in metrics.get("criteria", {DEFAULT_CRITERION: metrics}).items():
        line = f"{c}: held-out label accuracy {m['eval_accuracy']:.3f}"
        if "eval_spearman" in m:
            line += f", gold-order agreement {m['eval_gold_agreement']:.3f}, gold Spearman {m['eval_spearman']:.3f}"
        lines.append(line + f" ({m['test_pairs']} pairs)")
    return lines
