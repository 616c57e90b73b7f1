"""``FeedbackSettings``: the ``feedback`` section (criteria, overlap, the store, item batches, the simulated annotator)."""

from __future__ import annotations

from pydantic import Field, field_validator

from envs.data import DEFAULT_CRITERION, NAME_PATTERN
from envs.settings import Settings


class FeedbackSettings(Settings):
    """The ``feedback`` section: how people label, where labels live, and how rounds collect them."""

    criteria: list[str] = Field(default_factory=lambda: ["quality", "safety", "consistency"])
    """Criteria judged besides the overall choice (names: a-z, 0-9, _); each is optional for the annotator."""
    overlap: int = Field(1, ge=1, le=16)
    """Different annotators who see each item (>= 2 for agreement studies); nobody sees an item twice."""
    db_url: str = ""
    """SQLAlchemy URL of the label store (e.g. postgresql+psycopg://...); empty = SQLite at <run.output_dir>/labels.db."""
    sqlite_synchronous: str = Field("FULL", pattern="^(NORMAL|FULL)$")
    """SQLite fsync level: FULL survives power loss; NORMAL survives a killed process (not an OS crash) and is faster."""
    batch_size: int = Field(8, ge=1, le=64)
    """Items generated from the policy at a time, when an annotator asks and no item is left."""
    round_items: int = Field(64, ge=1)
    """Items generated and labelled per round of `alignray iterate` (each by `overlap` annotators)."""
    temperature: float = Field(1.0, gt=0, le=2)
    """Sampling temperature of the candidate responses."""
    claim_timeout_s: float = Field(1800.0, gt=0)
    """An item assigned but not labelled for this long goes back to the pool."""
    max_comment_chars: int = Field(2000, ge=0)
    """Longest comment an annotator may leave on a pair."""
    max_request_bytes: int = Field(65536, ge=1024)
    """Largest request body the app accepts (413 beyond)."""
    allowed_origins: list[str] = Field(default_factory=list)
    """Extra Origins allowed to POST (a reverse proxy's public URL); the app's own origin always is."""
    num_replicas: int = Field(1, ge=1)
    """Replicas of the app (more than one wants a PostgreSQL db_url when they run on several hosts)."""
    simulated_annotators: int = Field(4, ge=1, le=64)
    """Simulated annotators labelling side by side in `alignray iterate --annotator simulated`."""
    simulated_tau: float = Field(0.1, gt=0)
    """Bradley-Terry temperature of the simulated annotator: P(a > b) = sigmoid((s_a - s_b) / tau) on VADER scores."""

    @field_validator("criteria")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not NAME_PATTERN.fullmatch(name):
                raise ValueError(f"criterion {name!r} must be a name like 'quality' (a-z, 0-9, _)")
        if DEFAULT_CRITERION in value:
            raise ValueError(f"{DEFAULT_CRITERION!r} is always asked; list only the other criteria")
        if len(set(value)) != len(value) or len(value) > 8:
            raise ValueError(f"criteria must be at most 8 distinct names, got {value}")
        return value
