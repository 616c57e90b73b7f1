"""The labelling app's JSON protocol: pydantic request and response models, and the statuses routes return.

Choices are sent as the annotator saw them (``left``, ``right``, ``tie``, ``bad``); the store
turns them into the item's order. Requests reject unknown fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from serve.protocol import ErrorResponse

Shown = Literal["left", "right", "tie", "bad"]
STATUSES = {
    400: "Invalid request: malformed JSON, an unknown field, criterion or choice, a comment too long.",
    401: "Missing or unknown token (Authorization: Bearer <token> from a personal link).",
    403: "The token may not do this (admin routes; the admin key cannot label), or a cross-site request.",
    404: "The slot is not assigned to you.",
    409: "The slot is already labelled, or the request_id was used for another label.",
    413: "Request body over feedback.max_request_bytes.",
}


def errors(*statuses: int) -> dict[int, dict]:
    """OpenAPI ``responses`` for a route: each status with its meaning and the error body."""
    return {s: {"model": ErrorResponse, "description": STATUSES[s]} for s in statuses}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelRequest(_Request):
    """``POST /api/label``: the judgement of one slot."""

    slot: StrictInt
    choices: dict[str, Shown]
    """Per criterion; ``overall`` is required, the configured criteria are optional."""
    comment: str = ""
    request_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{8,64}$")
    """Makes a retried request safe: a second submit with the same id returns the first label."""


class SlotRequest(_Request):
    """``POST /api/skip``."""

    slot: StrictInt


class EmptyRequest(_Request):
    """``POST /api/undo`` (a JSON body, so a cross-site form cannot send it)."""


class InviteRequest(_Request):
    """``POST /api/admin/invite``."""

    name: str = Field(min_length=1, max_length=64)
    role: Literal["annotator", "admin"] = "annotator"


class Item(BaseModel):
    """A pair as its annotator sees it. Text is text: the page renders it with textContent."""

    slot: int
    prompt: str
    left: str
    right: str


class Progress(BaseModel):
    labelled: int
    """Labels this annotator has given."""
    left: int
    """Items still open to this annotator (more may be generated)."""


class Next(BaseModel):
    """``GET /api/next`` and ``POST /api/undo``: the item to label now (null when nothing is left)."""

    item: Item | None
    progress: Progress
    criteria: list[str]
    previous: dict[str, Shown] | None = None
    """After an undo: the withdrawn choices, to show again."""
    comment: str = ""


class Saved(BaseModel):
    label: int
    progress: Progress


class Me(BaseModel):
    name: str
    role: str
    criteria: list[str]


class Invited(BaseModel):
    name: str
    link: str
    """Path (with the token in the fragment) to open on this server."""


class AdminItem(BaseModel):
    """A recent item for admins, with reward-model scores when a reward model is served."""

    item: int
    round: int
    prompt: str
    response_a: str
    response_b: str
    policy: str
    labels: int
    score_a: float | None = None
    score_b: float | None = None
