"""What the label store holds, read out: the preference export, and labelling and agreement statistics."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import func, select

from envs.data import DEFAULT_CRITERION, DataError, write_preferences
from envs.stats import cohen_kappa, krippendorff_alpha_nominal
from serve.labelling.schema import annotators, choices, items, skips, submissions
from serve.labelling.store import CHOICES, LabelStore


def export_rows(store: LabelStore, rounds: list[int] | None = None) -> list[dict]:
    """One preference row per label and criterion (the preference schema with the labelling columns)."""
    q = (
        select(
            items.c.id.label("item_id"),
            items.c.prompt,
            items.c.response_a,
            items.c.response_b,
            items.c.policy,
            annotators.c.name.label("annotator"),
            submissions.c.comment,
            submissions.c.created_at,
            choices.c.criterion,
            choices.c.choice,
        )
        .select_from(choices)
        .join(submissions, submissions.c.id == choices.c.submission_id)
        .join(items, items.c.id == submissions.c.item_id)
        .join(annotators, annotators.c.id == submissions.c.annotator_id)
        .order_by(submissions.c.id, choices.c.criterion != DEFAULT_CRITERION, choices.c.criterion)
    )
    if rounds is not None:
        q = q.where(items.c.round.in_(rounds))
    with store.reader.connect() as c:
        found = c.execute(q).all()
    rows = []
    for r in found:
        b_first = r.choice == "b"
        rows.append(
            {
                "prompt": r.prompt,
                "chosen": r.response_b if b_first else r.response_a,
                "rejected": r.response_a if b_first else r.response_b,
                "criterion": r.criterion,
                "annotator": r.annotator,
                "item_id": str(r.item_id),
                "tie": r.choice in ("tie", "bad"),
                "both_bad": r.choice == "bad",
                "created_at": datetime.fromtimestamp(r.created_at, UTC),
                "policy": r.policy or "unknown",
                "comment": r.comment,
            }
        )
    return rows


def export(store: LabelStore, path, rounds: list[int] | None = None) -> int:
    """Write every label (of `rounds`, or all) as a preference Parquet file; returns the row count."""
    rows = export_rows(store, rounds)
    if not rows:
        raise DataError(f"the label store {store.url} holds no labels yet")
    write_preferences(path, rows)
    return len(rows)


def _labels_by_criterion(store: LabelStore) -> dict[str, dict[tuple[str, int], str]]:
    """criterion -> {(annotator, item): choice}."""
    q = (
        select(annotators.c.name, submissions.c.item_id, choices.c.criterion, choices.c.choice)
        .select_from(choices)
        .join(submissions, submissions.c.id == choices.c.submission_id)
        .join(annotators, annotators.c.id == submissions.c.annotator_id)
    )
    out: dict[str, dict[tuple[str, int], str]] = {}
    with store.reader.connect() as c:
        for name, item, criterion, choice in c.execute(q):
            out.setdefault(criterion, {})[(name, item)] = choice
    return out


def agreement(labels: dict[tuple[str, int], str]) -> dict:
    """Cohen's kappa per pair of annotators on their shared items, Krippendorff's alpha over everyone."""
    names = sorted({a for a, _ in labels})
    units = sorted({i for _, i in labels})
    code = {c: k for k, c in enumerate(CHOICES)}
    data = np.full((len(names), len(units)), np.nan)  # (annotators, items)
    col = {u: j for j, u in enumerate(units)}
    for (a, i), choice in labels.items():
        data[names.index(a), col[i]] = code[choice]
    pairs = []
    for x, y in itertools.combinations(range(len(names)), 2):
        shared = ~np.isnan(data[x]) & ~np.isnan(data[y])
        if shared.any():
            kappa = cohen_kappa(data[x, shared], data[y, shared])
            pairs.append({"annotators": [names[x], names[y]], "items": int(shared.sum()), "kappa": _num(kappa)})
    overlapping = int(((~np.isnan(data)).sum(0) >= 2).sum())
    return {"pairs": pairs, "overlapping_items": overlapping, "alpha": _num(krippendorff_alpha_nominal(data))}


def _num(x: float) -> float | None:
    """JSON-safe: nan (undefined) becomes None."""
    return None if x != x else round(float(x), 4)


def stats(store: LabelStore) -> dict:
    """Labels per annotator and per hour, slots by state, and agreement per criterion."""
    recent = time.time() - 3600
    with store.reader.connect() as c:
        per_annotator = c.execute(
            select(
                annotators.c.name,
                annotators.c.role,
                select(func.count())
                .where(submissions.c.annotator_id == annotators.c.id)
                .scalar_subquery()
                .label("labels"),
                select(func.count())
                .where(submissions.c.annotator_id == annotators.c.id, submissions.c.created_at >= recent)
                .scalar_subquery()
                .label("last_hour"),
                select(func.count()).where(skips.c.annotator_id == annotators.c.id).scalar_subquery().label("skips"),
            ).order_by(annotators.c.name)
        ).all()
        hours = Counter(int(t // 3600) for t in c.execute(select(submissions.c.created_at)).scalars())
    return {
        "annotators": [
            {"name": r.name, "role": r.role, "labels": r.labels, "last_hour": r.last_hour, "skips": r.skips}
            for r in per_annotator
        ],
        "per_hour": [
            {"hour": datetime.fromtimestamp(int(h) * 3600, UTC).strftime("%Y-%m-%d %H:00"), "labels": n}
            for h, n in sorted(hours.items())
        ],
        "slots": store.slot_counts(),
        "agreement": {k: agreement(v) for k, v in sorted(_labels_by_criterion(store).items())},
    }


def format_stats(s: dict) -> str:
    """`alignray label stats` as plain text."""
    lines = ["annotator            role        labels  last hour  skips"]
    lines += [
        f"{a['name'][:20]:<20} {a['role']:<10} {a['labels']:>7} {a['last_hour']:>10} {a['skips']:>6}"
        for a in s["annotators"]
    ]
    lines += ["", "labels per hour (UTC): " + (", ".join(f"{h['hour']}: {h['labels']}" for h in s["per_hour"]) or "-")]
    sl = s["slots"]
    lines += [f"slots: {sl['done']} labelled, {sl['claimed']} being labelled, {sl['open']} open", "", "agreement"]
    for criterion, ag in s["agreement"].items():
        alpha = "n/a" if ag["alpha"] is None else f"{ag['alpha']:.3f}"
        lines.append(f"  {criterion}: Krippendorff's alpha {alpha} over {ag['overlapping_items']} overlapping items")
        for p in ag["pairs"]:
            kappa = "n/a" if p["kappa"] is None else f"{p['kappa']:.3f}"
            lines.append(f"    {p['annotators'][0]} / {p['annotators'][1]}: kappa {kappa} on {p['items']} items")
    return "\n".join(lines)


def recent_items(store: LabelStore, limit: int = 20) -> list[dict]:
    """The newest items with their label counts (for the admin page)."""
    labels = select(func.count()).where(submissions.c.item_id == items.c.id).scalar_subquery()
    q = select(items, labels.label("labels")).order_by(items.c.id.desc()).limit(limit)
    with store.reader.connect() as c:
        return [
            {
                "item": r.id,
                "round": r.round,
                "prompt": r.prompt,
                "response_a": r.response_a,
                "response_b": r.response_b,
                "policy": r.policy,
                "labels": r.labels,
            }
            for r in c.execute(q)
        ]
