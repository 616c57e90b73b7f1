"""Training the reward model on preference pairs with the Bradley-Terry loss.

``train_reward_model(settings, preferences)`` trains ``RewardModel`` on the train split of a
preference file, evaluates on the test split, and writes the model directory and ``metrics.json``
to ``settings.path``. Evaluation reports pairwise accuracy against the annotator's labels,
agreement with the noise-free gold ordering (pairs whose gold scores differ), and the Spearman
correlation of scores with gold scores over the held-out responses.

The file may be one ``alignray label export`` wrote: training uses the rows of the default
criterion (``overall``; rows of other criteria are for per-criterion heads) and skips ties and
"both bad" rows, which have no order for the Bradley-Terry loss (``envs.data.preference_pairs``).
``warm_start`` starts from a trained reward-model directory (its encoder, head and text settings)
instead of a fresh head, as iterated rounds do.
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

from envs.data import DEFAULT_CRITERION, DataError, load_preferences, preference_pairs
from envs.reward_model import RewardModel, RewardModelSettings
from envs.stats import pairwise_agreement, spearman

NORM_SAMPLE = 2000
"""Distinct training responses whose scores give the reward model's normalisation mean and std."""


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected) over the batch; inputs (B,)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def _pair_scores(rm: RewardModel, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B,) of the chosen and rejected responses of a batch, in one encoder pass over its distinct texts."""
    prompts = [r["prompt"] for r in rows]
    texts = rm.texts([r["chosen"] for r in rows], prompts) + rm.texts([r["rejected"] for r in rows], prompts)
    distinct = list(dict.fromkeys(texts))  # a response compared k times is encoded once
    where = {t: i for i, t in enumerate(distinct)}
    enc = rm.encode(distinct)
    scores = rm(enc["input_ids"], enc["attention_mask"])[torch.tensor([where[t] for t in texts])]  # (2B,)
    return scores[: len(rows)], scores[len(rows) :]


def prompt_batches(rows: list[dict], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Row indices of each step: prompt groups in random order, cut into batches of batch_size pairs.

    Keeping a prompt's comparisons next to each other lets each response be encoded once for all
    its pairs in a step (a group straddles at most two steps).
    """
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["prompt"], []).append(i)
    keys = list(groups)
    rng.shuffle(keys)
    order = []
    for k in keys:
        members = groups[k][:]
        rng.shuffle(members)
        order += members
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def evaluate_rm(rm: RewardModel, rows: list[dict], batch_size: int = 64) -> dict[str, float]:
    """Label accuracy, gold-order agreement and Spearman vs gold on preference rows."""
    prompts = [r["prompt"] for r in rows]
    sc = np.array(rm.score([r["chosen"] for r in rows], prompts, batch_size))
    sr = np.array(rm.score([r["rejected"] for r in rows], prompts, batch_size))
    out = {"accuracy": float((sc > sr).mean()), "pairs": len(rows)}
    if "chosen_score" in rows[0]:
        gc = np.array([r["chosen_score"] for r in rows])
        gr = np.array([r["rejected_score"] for r in rows])
        out["gold_agreement"], out["gold_pairs"] = pairwise_agreement(sc, sr, gc, gr)
        out["spearman"] = spearman(np.concatenate([sc, sr]), np.concatenate([gc, gr]))
    return out


def _fit(rm: RewardModel, rows: list[dict], rc: RewardModelSettings, seed: int) -> list[float]:
    """Run the optimisation loop with a progress bar; returns the per-step losses."""
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
                r_c, r_r = _pair_scores(rm, [rows[j] for j in indices])
                loss = bradley_terry_loss(r_c, r_r)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(rm.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    rm.eval()
    return losses


def train_reward_model(
    rc: RewardModelSettings, pref_path: str | Path, seed: int = 0, warm_start: str | Path | None = None
) -> dict:
    """Train (from `warm_start`'s weights if given), evaluate and save the reward model; returns the metrics."""
    torch.manual_seed(seed)
    train_rows = preference_pairs(load_preferences(pref_path, "train"))
    if not train_rows:
        raise DataError(f"{pref_path}: no {DEFAULT_CRITERION!r} preference pairs to train on (every row is a tie)")
    if rc.max_pairs:
        train_rows = train_rows[: rc.max_pairs]
    all_rows = preference_pairs(load_preferences(pref_path, None))
    test_rows = [r for r in all_rows if r.get("split") == "test"] or train_rows[-max(1, len(train_rows) // 10) :]
    rm = RewardModel.load(warm_start) if warm_start else RewardModel.untrained(rc)
    start = time.time()
    before = evaluate_rm(rm, test_rows, rc.score_batch_size)
    losses = _fit(rm, train_rows, rc, seed)
    # Normalisation stats (so env rewards are on a unit scale) over distinct training responses drawn
    # from every prompt: rows are grouped by prompt, so the first rows would cover only a few prompts.
    distinct = sorted({(r[k], r["prompt"]) for r in train_rows for k in ("chosen", "rejected")})
    sample = random.Random(seed).sample(distinct, min(NORM_SAMPLE, len(distinct)))
    scores = np.array(rm.score([t for t, _ in sample], [p for _, p in sample], batch_size=rc.score_batch_size))
    rm.score_mean, rm.score_std = float(scores.mean()), float(scores.std() or 1.0)
    after = evaluate_rm(rm, test_rows, rc.score_batch_size)
    out = rm.save(Path(rc.path))
    metrics = {
        "path": str(out),
        "backbone": rc.backbone,
        "warm_start": str(warm_start) if warm_start else None,
        "train_pairs": len(train_rows),
        "test_pairs": len(test_rows),
        "seconds": round(time.time() - start, 1),
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-20:])),
        "losses": losses,
        "score_mean": rm.score_mean,
        "score_std": rm.score_std,
        **{f"eval_{k}": v for k, v in after.items()},
        **{f"untrained_{k}": v for k, v in before.items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
