"""The label store: annotators and their tokens, items and their slots, labels; every write one transaction.

:class:`LabelStore` is plain synchronous SQLAlchemy (the app calls it from a thread). A label is
committed before :meth:`LabelStore.submit` returns, so an answered request is a durable label.
Assignment is atomic on SQLite (``BEGIN IMMEDIATE`` serialises writers) and on PostgreSQL
(``FOR UPDATE SKIP LOCKED`` plus a conditional ``UPDATE``): two annotators asking at once never
get the same slot, and ``UNIQUE(item_id, annotator_id)`` keeps anyone from seeing an item twice.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from serve.labelling.schema import annotators, choices, items, make_engine, metadata, skips, slots, submissions

CHOICES = ("a", "b", "tie", "bad")
"""A choice in the item's order: response_a better, response_b better, a tie, both bad."""
SHOWN = {"left": "a", "right": "b", "tie": "tie", "bad": "bad"}
"""A choice as the annotator saw it -> in the item's order when the slot is not flipped."""
ROLES = ("annotator", "admin")


class StoreError(ValueError):
    """A request the store refuses; ``status`` is the HTTP status the app answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Annotator:
    id: int
    name: str
    role: str


@dataclass(frozen=True)
class Assignment:
    """A slot as its annotator sees it: the pair in the slot's order (left, right)."""

    slot_id: int
    item_id: int
    prompt: str
    left: str
    right: str
    flipped: bool


def hash_token(token: str) -> str:
    """Tokens are stored hashed: a leaked database does not leak working links."""
    return hashlib.sha256(token.encode()).hexdigest()


def to_item_order(shown: str, flipped: bool) -> str:
    """A displayed choice (left/right/tie/bad) in the item's order (a/b/tie/bad)."""
    choice = SHOWN[shown]
    return {"a": "b", "b": "a"}.get(choice, choice) if flipped else choice


def to_shown(choice: str, flipped: bool) -> str:
    """Inverse of :func:`to_item_order`."""
    if flipped:
        choice = {"a": "b", "b": "a"}.get(choice, choice)
    return {"a": "left", "b": "right"}.get(choice, choice)


class LabelStore:
    """Annotators, items, slots and labels in one SQL database (created on first use)."""

    def __init__(self, url: str, overlap: int = 1, claim_timeout_s: float = 1800.0, synchronous: str = "FULL"):
        self.url, self.overlap, self.claim_timeout_s = url, overlap, claim_timeout_s
        self.engine = make_engine(url, synchronous)
        self.reader = self.engine.execution_options(sqlite_deferred=True)
        metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ---- annotators ---------------------------------------------------------------------------

    def invite(self, name: str, role: str = "annotator") -> str:
        """A new token for `name` (created if new; an existing person's old link stops working)."""
        if role not in ROLES or not name.strip() or len(name) > 64:
            raise StoreError(400, f"invite needs a name of 1-64 characters and a role in {ROLES}")
        token = secrets.token_urlsafe(24)
        with self.engine.begin() as c:
            found = c.execute(select(annotators.c.id).where(annotators.c.name == name)).scalar()
            values = {"role": role, "token_hash": hash_token(token)}
            if found is None:
                c.execute(insert(annotators).values(name=name, created_at=time.time(), **values))
            else:
                c.execute(update(annotators).where(annotators.c.id == found).values(**values))
        return token

    def authenticate(self, token: str) -> Annotator | None:
        """The annotator a token belongs to, if any."""
        if not token:
            return None
        with self.reader.connect() as c:
            row = c.execute(select(annotators).where(annotators.c.token_hash == hash_token(token))).first()
        return Annotator(row.id, row.name, row.role) if row else None

    # ---- items --------------------------------------------------------------------------------

    def add_items(self, round_: int, rows: list[dict], keys: list[str]) -> int:
        """Insert items (prompt, response_a, response_b, policy) with their slots; rows whose key exists are skipped."""
        added, now = 0, time.time()
        with self.engine.begin() as c:
            known: set[str] = set()
            for i in range(0, len(keys), 500):  # bounded IN lists (SQLite caps bound parameters)
                known |= set(c.execute(select(items.c.key).where(items.c.key.in_(keys[i : i + 500]))).scalars())
            for row, key in zip(rows, keys):
                if key in known:
                    continue
                known.add(key)
                fields = {k: row[k] for k in ("prompt", "response_a", "response_b")}
                item_id = c.execute(
                    insert(items).values(key=key, round=round_, policy=row.get("policy", ""), created_at=now, **fields)
                ).inserted_primary_key[0]
                flips = random.Random(key)  # the shown order is random, and reproducible from the key
                c.execute(
                    insert(slots),
                    [
                        {"item_id": item_id, "slot_index": i, "flipped": flips.random() < 0.5, "state": "open"}
                        for i in range(self.overlap)
                    ],
                )
                added += 1
        return added

    def round_items(self, round_: int) -> int:
        """Items of one round so far."""
        with self.reader.connect() as c:
            return c.execute(select(func.count()).select_from(items).where(items.c.round == round_)).scalar()

    def slot_counts(self, round_: int | None = None) -> dict[str, int]:
        """Slots by state (open, claimed, done), of one round or all."""
        q = select(slots.c.state, func.count()).group_by(slots.c.state)
        if round_ is not None:
            q = q.join(items, items.c.id == slots.c.item_id).where(items.c.round == round_)
        with self.reader.connect() as c:
            counts = dict(c.execute(q).all())
        return {s: counts.get(s, 0) for s in ("open", "claimed", "done")}

    # ---- assignment ---------------------------------------------------------------------------

    def _assignment(self, c, slot_id: int) -> Assignment:
        row = c.execute(
            select(slots.c.id, slots.c.item_id, slots.c.flipped, items.c.prompt, items.c.response_a, items.c.response_b)
            .join(items, items.c.id == slots.c.item_id)
            .where(slots.c.id == slot_id)
        ).one()
        left, right = (row.response_b, row.response_a) if row.flipped else (row.response_a, row.response_b)
        return Assignment(row.id, row.item_id, row.prompt, left, right, row.flipped)

    def _free_slot(self, annotator_id: int, now: float):
        """The predicate of a slot `annotator_id` may take: free (or abandoned), on an item new to them."""
        mine = select(slots.c.item_id).where(slots.c.annotator_id == annotator_id)
        skipped = select(skips.c.item_id).where(skips.c.annotator_id == annotator_id)
        free = or_(
            slots.c.state == "open",
            and_(slots.c.state == "claimed", slots.c.claimed_at < now - self.claim_timeout_s),
        )
        return and_(free, slots.c.item_id.not_in(mine), slots.c.item_id.not_in(skipped))

    def claim(self, annotator_id: int) -> Assignment | None:
        """The annotator's current slot, else a newly assigned one, else None (nothing left for them)."""
        for _ in range(5):  # a lost race on PostgreSQL is retried; SQLite's writers never race
            now = time.time()
            try:
                with self.engine.begin() as c:
                    held = c.execute(
                        select(slots.c.id)
                        .where(slots.c.annotator_id == annotator_id, slots.c.state == "claimed")
                        .order_by(slots.c.id)
                        .limit(1)
                    ).scalar()
                    if held is not None:
                        return self._assignment(c, held)
                    sid = c.execute(
                        select(slots.c.id)
                        .where(self._free_slot(annotator_id, now))
                        .order_by(slots.c.item_id, slots.c.slot_index)
                        .limit(1)
                        .with_for_update(skip_locked=True)
                    ).scalar()
                    if sid is None:
                        return None
                    won = c.execute(
                        update(slots)
                        .where(slots.c.id == sid, self._free_slot(annotator_id, now))
                        .values(annotator_id=annotator_id, state="claimed", claimed_at=now)
                    ).rowcount
                    if won == 1:
                        return self._assignment(c, sid)
            except IntegrityError:  # two claims of one annotator raced onto one item
                continue
        return None

    def _own_slot(self, c, annotator_id: int, slot_id: int):
        """The slot row if it is assigned to this annotator; 404 otherwise (never say whose it is)."""
        row = c.execute(select(slots).where(slots.c.id == slot_id, slots.c.annotator_id == annotator_id)).first()
        if row is None:
            raise StoreError(404, f"slot {slot_id} is not assigned to you")
        return row

    def submit(
        self, annotator_id: int, slot_id: int, shown: dict[str, str], comment: str = "", request_id: str | None = None
    ) -> int:
        """Commit a label (choices as shown, per criterion; 'overall' required); returns its id."""
        if "overall" not in shown:
            raise StoreError(400, "the overall choice is required")
        if bad := [v for v in shown.values() if v not in SHOWN]:
            raise StoreError(400, f"a choice must be one of {list(SHOWN)}, got {bad[0]!r}")
        with self.engine.begin() as c:
            if request_id is not None:
                replay = c.execute(
                    select(submissions.c.id, submissions.c.annotator_id).where(submissions.c.request_id == request_id)
                ).first()
                if replay is not None:
                    if replay.annotator_id != annotator_id:
                        raise StoreError(409, "request_id already used")
                    return replay.id
            slot = self._own_slot(c, annotator_id, slot_id)
            if slot.state != "claimed":
                raise StoreError(409, f"slot {slot_id} is already labelled")
            c.execute(update(slots).where(slots.c.id == slot_id).values(state="done"))
            sub_id = c.execute(
                insert(submissions).values(
                    slot_id=slot_id,
                    item_id=slot.item_id,
                    annotator_id=annotator_id,
                    request_id=request_id,
                    comment=comment,
                    created_at=time.time(),
                )
            ).inserted_primary_key[0]
            rows = [
                {"submission_id": sub_id, "criterion": k, "choice": to_item_order(v, slot.flipped)}
                for k, v in shown.items()
            ]
            c.execute(insert(choices), rows)
        return sub_id

    def skip(self, annotator_id: int, slot_id: int) -> None:
        """Give the slot back to the pool; this annotator never gets the item again."""
        with self.engine.begin() as c:
            slot = self._own_slot(c, annotator_id, slot_id)
            if slot.state != "claimed":
                raise StoreError(409, f"slot {slot_id} is already labelled")
            c.execute(
                update(slots).where(slots.c.id == slot_id).values(state="open", annotator_id=None, claimed_at=None)
            )
            c.execute(insert(skips).values(annotator_id=annotator_id, item_id=slot.item_id, created_at=time.time()))

    def undo(self, annotator_id: int) -> tuple[Assignment, dict[str, str], str] | None:
        """Withdraw the annotator's latest label: its slot is theirs again (returned with the old choices, as shown)."""
        with self.engine.begin() as c:
            sub = c.execute(
                select(submissions)
                .where(submissions.c.annotator_id == annotator_id)
                .order_by(submissions.c.id.desc())
                .limit(1)
            ).first()
            if sub is None:
                return None
            flipped = c.execute(select(slots.c.flipped).where(slots.c.id == sub.slot_id)).scalar()
            old = {
                r.criterion: to_shown(r.choice, flipped)
                for r in c.execute(select(choices).where(choices.c.submission_id == sub.id))
            }
            c.execute(delete(choices).where(choices.c.submission_id == sub.id))
            c.execute(delete(submissions).where(submissions.c.id == sub.id))
            # The item they were looking at goes back to the pool; the undone one is theirs again.
            c.execute(
                update(slots)
                .where(slots.c.annotator_id == annotator_id, slots.c.state == "claimed")
                .values(state="open", annotator_id=None, claimed_at=None)
            )
            c.execute(update(slots).where(slots.c.id == sub.slot_id).values(state="claimed", claimed_at=time.time()))
            return self._assignment(c, sub.slot_id), old, sub.comment

    def progress(self, annotator_id: int) -> dict[str, int]:
        """This annotator's labels so far and the slots still open to them."""
        now = time.time()
        with self.reader.connect() as c:
            done = c.execute(
                select(func.count()).select_from(submissions).where(submissions.c.annotator_id == annotator_id)
            ).scalar()
            left = c.execute(select(func.count()).select_from(slots).where(self._free_slot(annotator_id, now))).scalar()
            held = c.execute(
                select(exists().where(slots.c.annotator_id == annotator_id, slots.c.state == "claimed"))
            ).scalar()
        return {"labelled": done, "left": left + int(bool(held))}
