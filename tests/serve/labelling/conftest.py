"""Label-store fixtures: a database URL per backend (SQLite file, and PostgreSQL when installed)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from serve.labelling.schema import metadata
from serve.labelling.store import LabelStore
from tests.fixtures.postgres import postgres_url


@pytest.fixture(scope="session")
def pg_server():
    with postgres_url() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty database: a SQLite file, or a wiped PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'labels.db'}"
    url = request.getfixturevalue("pg_server")
    if url is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    engine = create_engine(url)
    metadata.drop_all(engine)
    engine.dispose()
    return url


def make_items(n: int, tag: str = "") -> tuple[list[dict], list[str]]:
    """n candidate pairs and their keys."""
    rows = [
        {"prompt": f"prompt {i}{tag}", "response_a": f"first {i}", "response_b": f"second {i}", "policy": "tiny"}
        for i in range(n)
    ]
    return rows, [f"k{i}{tag}" for i in range(n)]


@pytest.fixture
def store_for(db_url):
    """A function (overlap, claim_timeout_s) -> LabelStore on the test's database; all closed at the end."""
    made = []

    def make(overlap: int = 1, claim_timeout_s: float = 1800.0) -> LabelStore:
        made.append(LabelStore(db_url, overlap=overlap, claim_timeout_s=claim_timeout_s))
        return made[-1]

    yield make
    for s in made:
        s.close()
