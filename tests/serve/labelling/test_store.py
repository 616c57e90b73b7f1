"""The label store on SQLite and PostgreSQL: assignment, concurrency, skip, undo, idempotent submits, export, stats."""

from __future__ import annotations

import threading
import time

import pytest

from serve.labelling.reports import agreement, export_rows, stats
from serve.labelling.store import StoreError
from tests.serve.labelling.conftest import make_items


def _annotator(store, name: str) -> int:
    return store.authenticate(store.invite(name)).id


def test_labels_are_stored_in_the_items_order_and_exported(store_for):
    store = store_for()
    assert store.add_items(1, *make_items(3)) == 3
    assert store.add_items(1, *make_items(3)) == 0  # same keys: nothing new
    ada = _annotator(store, "ada")
    seen = []
    while (job := store.claim(ada)) is not None:
        seen.append(job)
        # "left" is what was shown on the left: response_b when the slot is flipped.
        store.submit(ada, job.slot_id, {"overall": "left", "safety": "tie"}, comment="<b>ok</b>")
    assert len(seen) == 3 and {j.flipped for j in seen} == {True, False}  # keys k0..k2 flip differently
    rows = export_rows(store)
    assert [r["criterion"] for r in rows] == ["overall", "safety"] * 3
    for job, overall, safety in zip(seen, rows[::2], rows[1::2]):
        assert overall["chosen"] == job.left and overall["rejected"] == job.right and not overall["tie"]
        assert overall["annotator"] == "ada" and overall["item_id"] == str(job.item_id)
        assert safety["tie"] and not safety["both_bad"] and safety["comment"] == "<b>ok</b>"
    assert store.progress(ada) == {"labelled": 3, "left": 0}


def test_two_annotators_asking_at_once_never_share_the_one_free_slot(store_for):
    store = store_for()
    people = [_annotator(store, n) for n in ("ada", "bob")]
    for round_ in range(10):
        store.add_items(round_, *make_items(1, tag=f"-{round_}"))
        barrier, got = threading.Barrier(2), {}

        def ask(who: int, barrier: threading.Barrier, got: dict) -> None:
            barrier.wait()
            got[who] = store.claim(who)

        threads = [threading.Thread(target=ask, args=(p, barrier, got)) for p in people]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [p for p in people if got[p] is not None]
        assert len(winners) == 1, got
        store.submit(winners[0], got[winners[0]].slot_id, {"overall": "bad"})
    assert store.slot_counts() == {"open": 0, "claimed": 0, "done": 10}


def test_many_annotators_drain_the_pool_without_duplicates(store_for):
    store = store_for(overlap=2)
    store.add_items(1, *make_items(12))
    people = [_annotator(store, f"p{i}") for i in range(4)]
    labelled: dict[int, list[int]] = {p: [] for p in people}

    def work(who: int) -> None:
        while (job := store.claim(who)) is not None:
            store.submit(who, job.slot_id, {"overall": "right"})
            labelled[who].append(job.item_id)

    threads = [threading.Thread(target=work, args=(p,)) for p in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for items in labelled.values() for i in items]
    assert len(everything) == 24 and all(everything.count(i) == 2 for i in set(everything))
    assert all(len(set(items)) == len(items) for items in labelled.values())  # never the same item twice


def test_skip_gives_the_item_to_someone_else_and_never_back(store_for):
    store = store_for()
    store.add_items(1, *make_items(1))
    ada, bob = _annotator(store, "ada"), _annotator(store, "bob")
    job = store.claim(ada)
    store.skip(ada, job.slot_id)
    assert store.claim(ada) is None
    assert store.claim(bob).slot_id == job.slot_id
    with pytest.raises(StoreError) as err:
        store.submit(ada, job.slot_id, {"overall": "left"})  # no longer ada's
    assert err.value.status == 404


def test_undo_returns_the_last_label_to_its_annotator(store_for):
    store = store_for()
    store.add_items(1, *make_items(3))
    ada = _annotator(store, "ada")
    first = store.claim(ada)
    store.submit(ada, first.slot_id, {"overall": "left"})
    second = store.claim(ada)
    store.submit(ada, second.slot_id, {"overall": "bad", "quality": "right"}, comment="meh")
    current = store.claim(ada)
    job, old, comment = store.undo(ada)
    assert job.slot_id == second.slot_id and old == {"overall": "bad", "quality": "right"} and comment == "meh"
    assert store.claim(ada).slot_id == second.slot_id  # the undone item is theirs again
    assert len(export_rows(store)) == 1
    assert store.slot_counts() == {"open": 1, "claimed": 1, "done": 1}  # the one they were on went back
    assert current.slot_id != second.slot_id


def test_a_retried_submit_is_answered_once_and_slots_are_private(store_for):
    store = store_for()
    store.add_items(1, *make_items(2))
    ada, bob = _annotator(store, "ada"), _annotator(store, "bob")
    job = store.claim(ada)
    first = store.submit(ada, job.slot_id, {"overall": "left"}, request_id="req-1")
    assert store.submit(ada, job.slot_id, {"overall": "left"}, request_id="req-1") == first
    assert len(export_rows(store)) == 1
    with pytest.raises(StoreError) as err:
        store.submit(ada, job.slot_id, {"overall": "left"}, request_id="req-2")
    assert err.value.status == 409
    other = store.claim(bob)
    for call in (lambda: store.submit(ada, other.slot_id, {"overall": "left"}), lambda: store.skip(ada, other.slot_id)):
        with pytest.raises(StoreError) as err:
            call()
        assert err.value.status == 404
    with pytest.raises(StoreError):
        store.submit(bob, other.slot_id, {"overall": "<script>"})


def test_an_abandoned_slot_goes_back_to_the_pool(store_for):
    store = store_for(claim_timeout_s=0.05)
    store.add_items(1, *make_items(1))
    ada, bob = _annotator(store, "ada"), _annotator(store, "bob")
    job = store.claim(ada)
    assert store.claim(bob) is None
    time.sleep(0.1)
    assert store.claim(bob).slot_id == job.slot_id


def test_tokens_are_personal_and_reinviting_replaces_the_link(store_for):
    store = store_for()
    token = store.invite("ada")
    assert store.authenticate(token).name == "ada" and store.authenticate("nope") is None
    new = store.invite("ada", role="admin")
    assert store.authenticate(token) is None and store.authenticate(new).role == "admin"


def test_agreement_on_overlapping_items_matches_the_hand_worked_values(store_for):
    # Two annotators on 4 items, overall choices in the item's order: x = a a b b, y = a b b b.
    # Kappa: p_o = 3/4; x marginals (a .5, b .5), y (a .25, b .75) -> p_e = .125 + .375 = .5 -> (.75 - .5)/.5 = 0.5.
    # Alpha: units (a,a) (a,b) (b,b) (b,b): o_aa = 2, o_ab = o_ba = 1, o_bb = 4; n_a = 3, n_b = 5, n = 8
    # -> 1 - 7 * (8 - 6) / (64 - 9 - 25) = 8/15.
    store = store_for(overlap=2)
    store.add_items(1, *make_items(4))
    x, y = _annotator(store, "x"), _annotator(store, "y")
    for who, wanted in ((x, "aabb"), (y, "abbb")):
        for want in wanted:
            job = store.claim(who)
            shown = ("left" if want == "a" else "right") if not job.flipped else ("right" if want == "a" else "left")
            store.submit(who, job.slot_id, {"overall": shown})
    s = stats(store)
    overall = s["agreement"]["overall"]
    assert overall["pairs"] == [{"annotators": ["x", "y"], "items": 4, "kappa": 0.5}]
    assert overall["alpha"] == pytest.approx(8 / 15, abs=1e-4) and overall["overlapping_items"] == 4
    assert {a["name"]: a["labels"] for a in s["annotators"]} == {"x": 4, "y": 4}
    assert sum(h["labels"] for h in s["per_hour"]) == 8


def test_agreement_without_overlap_is_undefined():
    assert agreement({("x", 1): "a", ("y", 2): "b"}) == {"pairs": [], "overlapping_items": 0, "alpha": None}
