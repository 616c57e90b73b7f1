"""Prompt and preference datasets in Parquet: schemas, validation, reading and writing.

Prompt file (``data/prompts.parquet``)
    ``prompt``  string, non-empty: the opening of a movie review to continue.
    ``split``   string, ``"train"`` or ``"test"`` (optional; missing means every row is train).

Preference file (``data/preferences.parquet``); bring your own with just the first three columns.
    ``prompt``          string, non-empty
    ``chosen``          string, non-empty: the preferred response
    ``rejected``        string, non-empty: the other response
    ``split``           string, ``"train"`` or ``"test"`` (optional)
    ``chosen_score``    float, not NaN: gold score of ``chosen`` (optional, for evaluation)
    ``rejected_score``  float, not NaN: gold score of ``rejected`` (optional)

    Columns written by ``alignray label export`` (all optional; a file without them means one
    default criterion, no ties, unknown annotators):

    ``criterion``       name: which judgement the row is (``overall``, or a criterion such as
                        ``quality``); a missing column means every row is :data:`DEFAULT_CRITERION`
    ``annotator``       string: who labelled the pair
    ``item_id``         string: the compared pair; every criterion of one judgement shares it, and
                        with ``feedback.overlap`` > 1 several annotators' rows do too
    ``tie``             bool: no preference (a tie, or both responses bad). ``chosen``/``rejected``
                        are then just the first/second response, and Bradley-Terry training skips
                        the row (:func:`preference_pairs`)
    ``both_bad``        bool: the annotator said both responses were bad (``tie`` is true too)
    ``created_at``      timestamp (UTC): when the label was committed
    ``policy``          string: the model that wrote the responses
    ``comment``         string, may be empty: the annotator's note on the pair

Candidate file (``alignray label --candidates``): pairs of responses for people to compare.
    ``prompt``, ``response_a``, ``response_b``  string, non-empty
    ``policy``          string (optional): the model that wrote them

Every problem is reported as a :class:`DataError` naming the file, and the row and column
where there is one.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from envs.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]

PROMPT_COLUMNS = {"prompt": "text", "split": "split"}
PREFERENCE_COLUMNS = {
    "prompt": "text",
    "chosen": "text",
    "rejected": "text",
    "split": "split",
    "chosen_score": "score",
    "rejected_score": "score",
    "criterion": "name",
    "annotator": "text",
    "item_id": "text",
    "tie": "flag",
    "both_bad": "flag",
    "created_at": "time",
    "policy": "text",
    "comment": "note",
}
CANDIDATE_COLUMNS = {"prompt": "text", "response_a": "text", "response_b": "text", "policy": "text"}
REQUIRED_PROMPT = ("prompt",)
REQUIRED_PREFERENCE = ("prompt", "chosen", "rejected")
REQUIRED_CANDIDATE = ("prompt", "response_a", "response_b")
SPLITS = ("train", "test")
DEFAULT_CRITERION = "overall"
"""The criterion of a preference row without a ``criterion`` column: the one overall judgement."""
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,39}")
"""A criterion name: lower-case letters, digits and underscores, starting with a letter, at most 40."""
ARROW_TYPES = {
    "text": pa.string(),
    "split": pa.string(),
    "score": pa.float64(),
    "name": pa.string(),
    "flag": pa.bool_(),
    "time": pa.timestamp("us", tz="UTC"),
    "note": pa.string(),
}


class DataSettings(Settings):
    """The ``data`` section: which prompt and preference files to use."""

    prompts: str = "data/prompts.parquet"
    """Prompt Parquet file (columns: prompt, split); relative paths are resolved against the repo root."""
    preferences: str = "data/preferences.parquet"
    """Preference Parquet file (prompt, chosen, rejected[, split, scores, ...]); `alignray label export` writes one."""
    max_prompts: int = Field(0, ge=0)
    """Use only the first N training prompts (0 = all)."""


def resolve_path(path: str | Path) -> Path:
    """An absolute path stays; a relative one is taken from the current directory, else from the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


class DataError(ValueError):
    """A dataset file is missing, unreadable or breaks its schema; names file, row and column."""


def _read(path: str | Path) -> pa.Table:
    """Read a Parquet file or raise DataError naming it."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    try:
        return pq.read_table(p)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{p}: not a readable Parquet file ({err})") from err


def _check_value(path: Path, row: int, col: str, kind: str, value: object) -> None:
    """Raise DataError if one cell breaks its column's rule."""
    where = f"{path}: row {row}, column {col!r}"
    if kind in ("text", "split"):
        if not isinstance(value, str):
            raise DataError(f"{where}: expected a string, got {value!r}")
        if not value.strip():
            raise DataError(f"{where}: empty text")
        if kind == "split" and value not in SPLITS:
            raise DataError(f"{where}: split must be one of {SPLITS}, got {value!r}")
    elif kind == "name":
        if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
            raise DataError(f"{where}: expected a name like 'quality' (a-z, 0-9, _), got {value!r}")
    elif kind == "flag":
        if not isinstance(value, bool):
            raise DataError(f"{where}: expected true or false, got {value!r}")
    elif kind == "time":
        if not isinstance(value, datetime):
            raise DataError(f"{where}: expected a timestamp, got {value!r}")
    elif kind == "note":
        if not isinstance(value, str):
            raise DataError(f"{where}: expected a string, got {value!r}")
    elif kind == "score":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{where}: expected a number, got {value!r}")
        if math.isnan(value) or math.isinf(value):
            raise DataError(f"{where}: score is {value}")


def validate(table: pa.Table, path: str | Path, columns: dict[str, str], required: tuple[str, ...]) -> list[dict]:
    """Check a table against a schema and return its rows as dicts (only the schema's columns)."""
    p = Path(path)
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(f"{p}: missing column {missing[0]!r} (has {table.column_names})")
    if table.num_rows == 0:
        raise DataError(f"{p}: the file has no rows")
    present = [c for c in columns if c in table.column_names]
    rows = table.select(present).to_pylist()
    for i, row in enumerate(rows):
        for col in present:
            _check_value(p, i, col, columns[col], row[col])
    return rows


def _split(rows: list[dict], split: str | None, path: str | Path) -> list[dict]:
    """Keep the rows of one split (rows without a split column count as train)."""
    if split is None:
        return rows
    kept = [r for r in rows if r.get("split", "train") == split]
    if not kept:
        raise DataError(f"{path}: no rows in split {split!r}")
    return kept


def load_prompts(path: str | Path, split: str | None = "train") -> list[str]:
    """Validated prompts of one split (None = all)."""
    rows = validate(_read(path), path, PROMPT_COLUMNS, REQUIRED_PROMPT)
    return [r["prompt"] for r in _split(rows, split, path)]


def load_preferences(path: str | Path, split: str | None = "train") -> list[dict]:
    """Validated preference rows of one split (None = all) as dicts."""
    rows = validate(_read(path), path, PREFERENCE_COLUMNS, REQUIRED_PREFERENCE)
    return _split(rows, split, path)


def criterion_of(row: dict) -> str:
    """The criterion a preference row judges (rows without one judge :data:`DEFAULT_CRITERION`)."""
    return row.get("criterion") or DEFAULT_CRITERION


def preference_pairs(rows: list[dict], criterion: str = DEFAULT_CRITERION) -> list[dict]:
    """The Bradley-Terry pairs of one criterion: its rows minus ties and "both bad" (no order to learn)."""
    return [r for r in rows if criterion_of(r) == criterion and not r.get("tie", False)]


def load_candidates(path: str | Path) -> list[dict]:
    """Validated candidate pairs (prompt, response_a, response_b[, policy]) as dicts."""
    return validate(_read(path), path, CANDIDATE_COLUMNS, REQUIRED_CANDIDATE)


def write_candidates(path: str | Path, rows: list[dict]) -> Path:
    """Write a candidate file from row dicts (validated on the way out)."""
    return _write(path, _table(rows, CANDIDATE_COLUMNS), CANDIDATE_COLUMNS, REQUIRED_CANDIDATE)


def _table(rows: list[dict], columns: dict[str, str]) -> pa.Table:
    """An Arrow table of the schema's columns present in the first row, typed by their kind."""
    names = [c for c in columns if c in rows[0]]
    return pa.table({c: pa.array([r[c] for r in rows], ARROW_TYPES[columns[c]]) for c in names})


def write_prompts(path: str | Path, prompts: list[str], splits: list[str] | None = None) -> Path:
    """Write a prompt file (validated on the way out)."""
    cols = {"prompt": pa.array(prompts, pa.string())}
    if splits is not None:
        cols["split"] = pa.array(splits, pa.string())
    return _write(path, pa.table(cols), PROMPT_COLUMNS, REQUIRED_PROMPT)


def write_preferences(path: str | Path, rows: list[dict]) -> Path:
    """Write a preference file from row dicts (validated on the way out)."""
    return _write(path, _table(rows, PREFERENCE_COLUMNS), PREFERENCE_COLUMNS, REQUIRED_PREFERENCE)


def _write(path: str | Path, table: pa.Table, columns: dict[str, str], required: tuple[str, ...]) -> Path:
    """Validate then write a table as Parquet."""
    p = Path(path)
    validate(table, p, columns, required)
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, p)
    return p
