"""The label store's tables (SQLAlchemy Core) and its engine: SQLite in WAL mode, or any SQLAlchemy URL.

An *item* is a prompt with two responses (``response_a``, ``response_b`` in the order they were
generated). Each item has ``overlap`` *slots*; a slot is assigned to one annotator at a time and
shows the pair in its own randomised order (``flipped``: B on the left). A *submission* is one
annotator's judgement of one slot, with one *choice* row per criterion (``overall`` always), each
stored in the item's order: ``a``, ``b``, ``tie`` or ``bad`` (both bad). Times are UNIX seconds.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine

metadata = MetaData()

annotators = Table(
    "annotators",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),  # annotator | admin
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
)

items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(64), nullable=False, unique=True),  # makes loading a candidate file idempotent
    Column("round", Integer, nullable=False),
    Column("prompt", Text, nullable=False),
    Column("response_a", Text, nullable=False),
    Column("response_b", Text, nullable=False),
    Column("policy", String(512), nullable=False),
    Column("created_at", Float, nullable=False),
)

slots = Table(
    "slots",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("item_id", Integer, ForeignKey("items.id"), nullable=False),
    Column("slot_index", Integer, nullable=False),
    Column("flipped", Boolean, nullable=False),
    Column("state", String(8), nullable=False),  # open | claimed | done
    Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=True),
    Column("claimed_at", Float, nullable=True),
    UniqueConstraint("item_id", "slot_index"),
    UniqueConstraint("item_id", "annotator_id"),  # nobody holds two slots of one item (NULLs are distinct)
    Index("ix_slots_state_item", "state", "item_id"),
)

submissions = Table(
    "submissions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("slot_id", Integer, ForeignKey("slots.id"), nullable=False, unique=True),
    Column("item_id", Integer, ForeignKey("items.id"), nullable=False),
    Column("annotator_id", Integer, ForeignKey("annotators.id"), nullable=False),
    Column("request_id", String(64), nullable=True, unique=True),  # a retried request is answered, not repeated
    Column("comment", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_submissions_annotator", "annotator_id", "id"),
)

choices = Table(
    "choices",
    metadata,
    Column("submission_id", Integer, ForeignKey("submissions.id", ondelete="CASCADE"), primary_key=True),
    Column("criterion", String(40), primary_key=True),
    Column("choice", String(4), nullable=False),  # a | b | tie | bad, in the item's order
)

skips = Table(
    "skips",
    metadata,
    Column("annotator_id", Integer, ForeignKey("annotators.id"), primary_key=True),
    Column("item_id", Integer, ForeignKey("items.id"), primary_key=True),
    Column("created_at", Float, nullable=False),
)


def make_engine(url: str, synchronous: str = "FULL") -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout, foreign keys and write transactions taken up front.

    ``BEGIN IMMEDIATE`` takes SQLite's write lock when a transaction starts: with a deferred
    BEGIN, a reader that later writes fails with "database is locked" instead of waiting.
    Read-only work can opt out with ``engine.execution_options(sqlite_deferred=True)``.
    """
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # sqlite3 must not issue its own (late) BEGIN
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", f"synchronous={synchronous}", "busy_timeout=30000", "foreign_keys=ON"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        deferred = conn.get_execution_options().get("sqlite_deferred")
        conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")

    return engine
