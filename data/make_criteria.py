"""Add per-criterion labels to data/preferences.parquet: positivity (as generated) and consistency.

The pairs stay those ``make_preferences.py`` sampled; only labels are added, from the texts:

- ``positivity`` rows: every row of the file as ``make_preferences.py`` wrote it (same chosen and
  rejected, the same VADER gold scores), now with ``criterion = "positivity"``.
- ``consistency`` rows: the same pairs, in the same order and split, labelled by a second simulated
  Bradley-Terry annotator on the consistency gold (``envs.gold.gold_consistency``: keep the
  opening's own sentiment), P(a > b) = sigmoid((c_a - c_b) / tau); ``chosen_score`` and
  ``rejected_score`` of these rows are the consistency gold scores.

Consistency differences are smaller than positivity's (median 0.15 vs 0.42), so the same tau
would be far noisier. ``--tau auto`` (the default) picks the tau at which the consistency
annotator is expected to disagree with its gold order on as many pairs as the positivity
annotator does with its own at tau = 0.1 (rounded to 3 decimals).

The positivity rows come first, in the original order, so readers that take the first test rows
still get positivity pairs. Running the script on its own output gives the same file (it takes
the positivity rows as the source). Deterministic for a given seed. It also prints how the two
gold criteria correlate over the shipped responses, by the sentiment of the opening.

    python data/make_criteria.py [--tau auto] [--seed 0] [--in data/preferences.parquet] [--out same]
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np

from envs.data import load_preferences, write_preferences
from envs.gold import gold_consistency, gold_positivity, gold_score
from envs.stats import spearman

DATA = Path(__file__).parent
POSITIVITY_TAU = 0.1
"""The tau make_preferences.py labelled positivity with."""
SENTIMENT_BANDS = (("negative", -1.01, -0.05), ("neutral", -0.05, 0.05), ("positive", 0.05, 1.01))
"""Opening sentiment bands by VADER compound (VADER's usual +-0.05 thresholds); lower bound inclusive only for neutral."""
FIELDS = ("prompt", "chosen", "rejected", "split", "chosen_score", "rejected_score")


def positivity_rows(rows: list[dict]) -> list[dict]:
    """The generated pairs as positivity rows: all rows of a file without criteria, else its positivity rows."""
    if any("criterion" in r for r in rows):
        rows = [r for r in rows if r.get("criterion") == "positivity"]
    return [{**{k: r[k] for k in FIELDS}, "criterion": "positivity"} for r in rows]


def expected_flips(diffs: np.ndarray, tau: float) -> float:
    """Expected share of Bradley-Terry labels against the gold order: mean sigmoid(-|d| / tau) (ties count 1/2)."""
    return float(np.mean(1.0 / (1.0 + np.exp(np.abs(diffs) / tau))))


def matched_tau(diffs: np.ndarray, target: float) -> float:
    """The tau whose expected flip share on `diffs` equals `target` (bisection; the share rises with tau)."""
    lo, hi = 1e-4, 10.0
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if expected_flips(diffs, mid) < target else (lo, mid)
    return round(math.sqrt(lo * hi), 3)


def consistency_rows(rows: list[dict], tau: float, seed: int) -> list[dict]:
    """One consistency row per positivity row: the same pair, labelled by a seeded Bradley-Terry annotator."""
    rng = random.Random(f"consistency-{seed}")
    out = []
    for r in rows:
        a, b = r["chosen"], r["rejected"]
        ca, cb = gold_consistency(r["prompt"], a), gold_consistency(r["prompt"], b)
        p_a = 1.0 / (1.0 + math.exp(-(ca - cb) / tau))
        chosen, rejected, sc, sr = (a, b, ca, cb) if rng.random() < p_a else (b, a, cb, ca)
        out.append(
            {
                "prompt": r["prompt"],
                "chosen": chosen,
                "rejected": rejected,
                "split": r["split"],
                "chosen_score": sc,
                "rejected_score": sr,
                "criterion": "consistency",
            }
        )
    return out


def gold_diffs(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, the chosen-minus-rejected (as stored) positivity and consistency gold differences."""
    dp = [gold_positivity(r["prompt"], r["chosen"]) - gold_positivity(r["prompt"], r["rejected"]) for r in rows]
    dc = [gold_consistency(r["prompt"], r["chosen"]) - gold_consistency(r["prompt"], r["rejected"]) for r in rows]
    return np.array(dp), np.array(dc)


def conflict(rows: list[dict]) -> list[dict]:
    """Pearson and Spearman correlation of the two gold criteria over distinct responses, by opening sentiment."""
    seen = sorted({(r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")})
    vp = np.array([gold_score(p) for p, _ in seen])
    pos = np.array([gold_positivity(p, t) for p, t in seen])
    con = np.array([gold_consistency(p, t) for p, t in seen])
    out = []
    for name, lo, hi in (*SENTIMENT_BANDS, ("all", -2.0, 2.0)):
        m = (vp >= lo) & (vp <= hi) if name == "neutral" else (vp > lo) & (vp < hi)
        few = m.sum() < 2  # no correlation of fewer than two responses
        out.append(
            {
                "openings": name,
                "responses": int(m.sum()),
                "pearson": float("nan") if few else float(np.corrcoef(pos[m], con[m])[0, 1]),
                "spearman": float("nan") if few else spearman(pos[m], con[m]),
            }
        )
    return out


def main() -> None:
    """Read the generated pairs, add the consistency labels, write the file and print the conflict."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tau", default="auto", help="consistency annotator's tau, or 'auto' (match positivity's noise)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--in", dest="src", default=str(DATA / "preferences.parquet"))
    ap.add_argument("--out", default=None, help="default: overwrite --in")
    args = ap.parse_args()
    base = positivity_rows(load_preferences(args.src, None))
    dp, dc = gold_diffs(base)
    target = expected_flips(dp, POSITIVITY_TAU)
    tau = matched_tau(dc, target) if args.tau == "auto" else float(args.tau)
    cons = consistency_rows(base, tau, args.seed)
    out = write_preferences(args.out or args.src, base + cons)
    print(f"{out}: {len(base)} positivity + {len(cons)} consistency rows")
    print(
        f"expected label flips: positivity {target:.3f} (tau {POSITIVITY_TAU}), consistency "
        f"{expected_flips(dc, tau):.3f} (tau {tau})"
    )
    both = (dp != 0) & (dc != 0)
    print(f"pairs whose gold orders disagree: {np.mean(np.sign(dp[both]) != np.sign(dc[both])):.3f} of {both.sum()}")
    for split in ("train", "test"):
        for c in conflict([r for r in base if r["split"] == split]):
            print(
                f"{split:5s} {c['openings']:8s} openings: {c['responses']:5d} responses, positivity vs consistency "
                f"Pearson {c['pearson']:+.3f}, Spearman {c['spearman']:+.3f}"
            )


if __name__ == "__main__":
    main()
