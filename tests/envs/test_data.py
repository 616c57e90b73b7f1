"""Prompt and preference files: the shipped data is valid; crafted bad files are reported precisely."""

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from envs.data import (
    DEFAULT_CRITERION,
    REPO_ROOT,
    DataError,
    criterion_of,
    load_candidates,
    load_preferences,
    load_prompts,
    preference_pairs,
    write_candidates,
    write_preferences,
    write_prompts,
)
from envs.gold import gold_score

ROW = {
    "prompt": "The film",
    "chosen": "was wonderful",
    "rejected": "was awful",
    "split": "train",
    "chosen_score": 0.57,
    "rejected_score": -0.46,
}


def test_shipped_prompts_are_valid_and_split():
    train = load_prompts(REPO_ROOT / "data/prompts.parquet", "train")
    test = load_prompts(REPO_ROOT / "data/prompts.parquet", "test")
    assert len(train) + len(test) >= 1000 and len(test) >= 100
    assert not set(train) & set(test)
    moods = [gold_score(p) for p in train[:300]]
    assert min(moods) < -0.3 and max(moods) > 0.3  # openings of every sentiment


def test_shipped_preferences_are_valid():
    path = REPO_ROOT / "data/preferences.parquet"
    if not path.exists():
        pytest.skip("preferences not generated yet")
    train, test = load_preferences(path, "train"), load_preferences(path, "test")
    assert len(train) >= 4000 and len(test) >= 500
    row = train[0]
    assert abs(gold_score(row["chosen"]) - row["chosen_score"]) < 1e-9


def test_round_trip(tmp_path):
    path = write_preferences(tmp_path / "p.parquet", [ROW, {**ROW, "split": "test"}])
    assert load_preferences(path, "train") == [ROW]
    assert len(load_preferences(path, None)) == 2
    write_prompts(tmp_path / "q.parquet", ["a", "b"], ["train", "test"])
    assert load_prompts(tmp_path / "q.parquet", "test") == ["b"]


def test_user_file_with_three_columns(tmp_path):
    path = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"]}), path)
    assert load_preferences(path, "train") == [{"prompt": "p", "chosen": "c", "rejected": "r"}]


def _write(tmp_path, **columns):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"prompt": ["p"], "chosen": ["c"]}, "missing column 'rejected'"),
        ({"prompt": ["p", "q"], "chosen": ["c", " "], "rejected": ["r", "r"]}, "row 1, column 'chosen': empty text"),
        (
            {"prompt": ["p", None], "chosen": ["c", "c"], "rejected": ["r", "r"]},
            "row 1, column 'prompt': expected a string",
        ),
        ({"prompt": ["p"], "chosen": ["c"], "rejected": [3]}, "row 0, column 'rejected': expected a string"),
        (
            {"prompt": ["p"], "chosen": ["c"], "rejected": ["r"], "chosen_score": [float("nan")]},
            "row 0, column 'chosen_score': score is nan",
        ),
        ({"prompt": ["p"], "chosen": ["c"], "rejected": ["r"], "split": ["dev"]}, "split must be one of"),
        (
            {
                "prompt": pa.array([], pa.string()),
                "chosen": pa.array([], pa.string()),
                "rejected": pa.array([], pa.string()),
            },
            "has no rows",
        ),
    ],
)
def test_bad_preference_files(tmp_path, columns, message):
    path = _write(tmp_path, **columns)
    with pytest.raises(DataError) as err:
        load_preferences(path, None)
    assert message in str(err.value) and str(path) in str(err.value)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_prompts(tmp_path / "none.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_prompts(junk)
    only_test = write_prompts(tmp_path / "t.parquet", ["a"], ["test"])
    with pytest.raises(DataError, match="no rows in split 'train'"):
        load_prompts(only_test, "train")


def test_all_pairs_compares_every_two_responses_of_a_prompt():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_preferences", REPO_ROOT / "data/make_preferences.py")
    mp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mp)
    prompts, pairs = mp.all_pairs(["p", "q", "p"], [("a", "b"), ("x", "y"), ("c", "a")])
    # p has a, b, c (a repeated, counted once); q has x, y.
    assert list(zip(prompts, pairs)) == [("p", ("a", "b")), ("p", ("a", "c")), ("p", ("b", "c")), ("q", ("x", "y"))]


def test_shipped_pairs_never_mix_splits_or_compare_a_text_with_itself():
    path = REPO_ROOT / "data/preferences.parquet"
    if not path.exists():
        pytest.skip("preferences not generated yet")
    train, test = load_preferences(path, "train"), load_preferences(path, "test")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert all(r["chosen"] != r["rejected"] for r in train)


LABELLED = {
    "prompt": "The film",
    "chosen": "was wonderful",
    "rejected": "was awful",
    "criterion": "overall",
    "annotator": "ada",
    "item_id": "r1-7",
    "tie": False,
    "both_bad": False,
    "created_at": datetime(2026, 11, 30, 12, 0, tzinfo=UTC),
    "policy": "smollm2",
    "comment": "",
}


def test_labelled_columns_round_trip_and_pairs(tmp_path):
    rows = [
        LABELLED,
        {**LABELLED, "criterion": "safety", "comment": "fine <b>"},
        {**LABELLED, "tie": True},
        {**LABELLED, "tie": True, "both_bad": True, "item_id": "r1-8"},
    ]
    back = load_preferences(write_preferences(tmp_path / "l.parquet", rows), None)
    assert back == rows
    assert preference_pairs(back) == [LABELLED]  # overall only, ties and both-bad skipped
    assert preference_pairs(back, "safety") == [rows[1]]
    plain = [{"prompt": "p", "chosen": "c", "rejected": "r"}]
    assert criterion_of(plain[0]) == DEFAULT_CRITERION and preference_pairs(plain) == plain


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("criterion", "Quality!", "expected a name"),
        ("tie", "yes", "expected true or false"),
        ("created_at", "yesterday", "expected a timestamp"),
        ("annotator", "", "empty text"),
    ],
)
def test_labelled_columns_are_validated(tmp_path, column, value, message):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{**LABELLED, column: value}]), path)  # Arrow columns have one type
    with pytest.raises(DataError, match=rf"row 0, column '{column}': {message}"):
        load_preferences(path, None)


def test_candidates_round_trip(tmp_path):
    rows = [{"prompt": "p", "response_a": "a", "response_b": "b", "policy": "tiny"}]
    assert load_candidates(write_candidates(tmp_path / "c.parquet", rows)) == rows
    with pytest.raises(DataError, match="missing column 'response_b'"):
        write_candidates(tmp_path / "bad.parquet", [{"prompt": "p", "response_a": "a"}])
