"""Small statistics used in evaluation, in plain NumPy (no SciPy needed at run time)."""

from __future__ import annotations

import numpy as np


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties given their average rank (SciPy's 'average' method)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length sequences (nan if either is constant)."""
    ra, rb = rankdata(np.asarray(a)), rankdata(np.asarray(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def pairwise_agreement(pred_a, pred_b, gold_a, gold_b) -> tuple[float, int]:
    """Share of pairs whose predicted order matches the gold order, over pairs with a gold difference."""
    pa, pb, ga, gb = map(np.asarray, (pred_a, pred_b, gold_a, gold_b))
    keep = ga != gb
    if not keep.any():
        return float("nan"), 0
    agree = np.sign(pa[keep] - pb[keep]) == np.sign(ga[keep] - gb[keep])
    return float(agree.mean()), int(keep.sum())
