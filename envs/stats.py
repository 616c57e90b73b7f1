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


def cohen_kappa(a, b) -> float:
    """Cohen's kappa of two annotators' labels on the same items (nan when chance agreement is 1).

    With the contingency table n_ck (items the first labelled c and the second k) over N items:
    p_o = sum_c n_cc / N, p_e = sum_c (n_c. / N)(n_.c / N), kappa = (p_o - p_e) / (1 - p_e).
    """
    a, b = np.asarray(a), np.asarray(b)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"cohen_kappa needs two equal, non-empty label lists, got {len(a)} and {len(b)}")
    cats, idx = np.unique(np.concatenate([a, b]), return_inverse=True)
    table = np.zeros((len(cats), len(cats)))  # (C, C)
    np.add.at(table, (idx[: len(a)], idx[len(a) :]), 1)
    n = table.sum()
    p_o = np.trace(table) / n
    p_e = (table.sum(1) / n) @ (table.sum(0) / n)
    return float((p_o - p_e) / (1 - p_e)) if p_e < 1 else float("nan")


def krippendorff_alpha_nominal(data) -> float:
    """Krippendorff's alpha for nominal labels; data (annotators, units) of category codes, nan = missing.

    Units with fewer than two values are not pairable and drop out. With the coincidence matrix
    o_ck = sum_u (ordered pairs (c, k) of values from different annotators in u) / (m_u - 1),
    n_c = sum_k o_ck and n = sum_c n_c: alpha = 1 - (n - 1)(n - sum_c o_cc) / (n^2 - sum_c n_c^2);
    nan when every pairable value is the same category.
    """
    data = np.asarray(data, dtype=float)  # (A, U)
    cats = np.unique(data[~np.isnan(data)])
    if len(cats) == 0:
        return float("nan")
    counts = np.stack([(data == c).sum(0) for c in cats], axis=1).astype(float)  # (U, C) values per category
    m = counts.sum(1)  # (U,)
    counts, m = counts[m >= 2], m[m >= 2]
    if len(m) == 0:
        return float("nan")
    w = counts / (m - 1)[:, None]
    o = np.einsum("uc,uk->ck", w, counts) - np.diag(w.sum(0))  # (C, C) coincidences
    n_c = o.sum(1)
    n = n_c.sum()
    d_e = n * n - (n_c**2).sum()
    return float(1 - (n - 1) * (n - np.trace(o)) / d_e) if d_e > 0 else float("nan")
