"""data/make_criteria.py: the consistency annotator, its tau, and the shipped per-criterion preference file."""

import hashlib
import importlib.util
import math

import numpy as np
import pytest

from envs.data import REPO_ROOT, criterion_of, load_preferences
from envs.gold import gold_consistency, gold_score

SPEC = importlib.util.spec_from_file_location("make_criteria", REPO_ROOT / "data/make_criteria.py")
mc = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(mc)

SHIPPED = REPO_ROOT / "data/preferences.parquet"
POSITIVITY_SHA256 = "4014c84013979131f72eded80cec96d3d9e4cc2b02b9482822b981ff067afb69"
"""sha256 of the rows data/make_preferences.py wrote (every field, in order), before criteria were added."""


def _rows():
    hated, liked = "I hated this movie", "a wonderful story"
    base = [
        {"prompt": hated, "chosen": "great", "rejected": "awful", "split": "train"},
        {"prompt": liked, "chosen": "great", "rejected": "awful", "split": "test"},
    ]
    return [{**r, "chosen_score": gold_score(r["chosen"]), "rejected_score": gold_score(r["rejected"])} for r in base]


def test_expected_flips_and_matched_tau_by_hand():
    # A gold difference of 0.2 at tau 0.1: sigmoid(-2) = 0.119203 of labels go against the gold order.
    assert mc.expected_flips(np.array([0.2, -0.2]), 0.1) == pytest.approx(0.119203, abs=1e-6)
    assert mc.expected_flips(np.array([0.0]), 0.1) == 0.5  # a tie is a coin toss
    # The tau giving the same share on differences of 0.1 is half as large: 0.05.
    assert mc.matched_tau(np.array([0.1, -0.1]), 1 / (1 + math.exp(2))) == 0.05


def test_consistency_labels_prefer_the_consistent_response_and_keep_the_pairs():
    rows = mc.positivity_rows(_rows())
    assert [r["criterion"] for r in rows] == ["positivity", "positivity"]
    cons = mc.consistency_rows(rows, tau=1e-3, seed=0)  # tau this small leaves no noise on these gaps
    # After a negative opening the consistent answer is "awful"; after a positive one, "great".
    assert [(r["chosen"], r["rejected"]) for r in cons] == [("awful", "great"), ("great", "awful")]
    assert [r["split"] for r in cons] == ["train", "test"] and {r["criterion"] for r in cons} == {"consistency"}
    assert cons[0]["chosen_score"] == pytest.approx(0.91095) and cons[0]["rejected_score"] == pytest.approx(0.3691)
    assert cons == mc.consistency_rows(rows, tau=1e-3, seed=0)


def test_labels_are_seeded_and_noisy_at_a_large_tau():
    rows = mc.positivity_rows(_rows()) * 200
    a, b = mc.consistency_rows(rows, 1.0, seed=0), mc.consistency_rows(rows, 1.0, seed=1)
    assert a == mc.consistency_rows(rows, 1.0, seed=0) and a != b
    flips = np.mean([r["chosen"] == "great" for r in a[::2]])  # the inconsistent answer chosen after "I hated"
    # P = sigmoid(-(0.91095 - 0.3691) / 1.0) = 0.3677; 200 draws
    assert flips == pytest.approx(0.3677, abs=0.1)


def test_conflict_by_opening_sentiment_by_hand():
    # VADER: "I hated this movie" -0.6369 (negative), "a wonderful story" 0.5719 (positive), "the film" 0 (neutral).
    # great (0.6249) vs awful (-0.4588): positivity prefers great everywhere; consistency prefers awful after
    # the negative opening (0.3691 vs 0.91095) and the neutral one (0.68755 vs 0.7706), great after the positive one.
    rows = [{"prompt": p, "chosen": "great", "rejected": "awful"} for p in ("I hated this movie", "a wonderful story")]
    got = {
        c["openings"]: c for c in mc.conflict(rows + [{"prompt": "the film", "chosen": "great", "rejected": "awful"}])
    }
    assert [got[b]["pearson"] for b in ("negative", "neutral", "positive")] == pytest.approx([-1.0, -1.0, 1.0])
    assert got["all"]["responses"] == 6
    no_neutral = {c["openings"]: c for c in mc.conflict(rows)}["neutral"]
    assert no_neutral["responses"] == 0 and math.isnan(no_neutral["pearson"]) and math.isnan(no_neutral["spearman"])


def test_rerunning_on_its_own_output_takes_the_positivity_rows():
    rows = mc.positivity_rows(_rows())
    again = mc.positivity_rows(rows + mc.consistency_rows(rows, 0.05, 0))
    assert again == rows


@pytest.fixture(scope="module")
def shipped():
    if not SHIPPED.exists():
        pytest.skip("preferences not generated yet")
    return load_preferences(SHIPPED, None)


def test_shipped_positivity_rows_are_the_generated_ones_bit_for_bit(shipped):
    pos = [r for r in shipped if criterion_of(r) == "positivity"]
    assert shipped[: len(pos)] == pos  # first, in the generated order
    h = hashlib.sha256()
    for r in pos:
        h.update(repr(tuple(r[k] for k in mc.FIELDS)).encode())
    assert h.hexdigest() == POSITIVITY_SHA256


def test_shipped_consistency_rows_are_the_same_pairs_labelled_deterministically(shipped):
    pos = [r for r in shipped if criterion_of(r) == "positivity"]
    cons = [r for r in shipped if criterion_of(r) == "consistency"]
    assert len(cons) == len(pos) and len(pos) + len(cons) == len(shipped)
    assert [(r["prompt"], {r["chosen"], r["rejected"]}, r["split"]) for r in cons] == [
        (r["prompt"], {r["chosen"], r["rejected"]}, r["split"]) for r in pos
    ]  # same pairs, same order, same split: the held-out pairs are the held-out pairs
    assert sum(r["split"] == "test" for r in cons) == 500
    for r in cons[::997]:
        assert r["chosen_score"] == gold_consistency(r["prompt"], r["chosen"])
    dp, dc = mc.gold_diffs(pos)
    tau = mc.matched_tau(dc, mc.expected_flips(dp, mc.POSITIVITY_TAU))
    assert tau == 0.033
    assert mc.consistency_rows(pos, tau, seed=0) == cons  # regenerating gives the shipped labels
