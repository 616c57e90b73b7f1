"""The labelling app over real HTTP on Ray Serve: auth, cross-site refusal, body bounds, generation from the
policy deployment, scores for admins only, simulated annotators, export -> train-rm, a killed replica."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from sqlalchemy import func, select

from cluster.config import load_config
from cluster.train import train_rm
from serve.labelling.client import LabelClient
from serve.labelling.reports import export
from serve.labelling.schema import choices, submissions
from serve.labelling.simulated import SimulatedAnnotator
from tests.serve.labelling.conftest import ADMIN_KEY, make_items

CRITERIA = ["quality", "safety", "consistency"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def fixed(label_servers):
    return label_servers["urls"]["fixed"], label_servers["stores"]["fixed"]


def test_pages_are_open_data_free_and_locked_down(fixed):
    url, _ = fixed
    page = httpx.get(url + "/", timeout=30)
    assert page.status_code == 200 and "/fixed/static/app.js" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
    js = httpx.get(url + "/static/app.js", timeout=30)
    assert js.headers["content-type"].startswith("text/javascript") and "innerHTML" not in js.text
    assert httpx.get(url + "/static/labels.db", timeout=30).status_code == 404
    assert httpx.get(url + "/static/..%2fstore.py", timeout=30).status_code == 404
    assert httpx.get(url + "/admin", timeout=30).status_code == 200  # the page; its data needs a token


def test_every_api_route_needs_a_token(fixed):
    url, _ = fixed
    for method, path in [("GET", "/api/next"), ("GET", "/api/me"), ("GET", "/api/admin/stats")]:
        assert httpx.request(method, url + path, timeout=30).status_code == 401
        assert httpx.request(method, url + path, headers=bearer("wrong"), timeout=30).status_code == 401
    posted = httpx.post(url + "/api/label", json={"slot": 1, "choices": {"overall": "left"}}, timeout=30)
    assert posted.status_code == 401 and posted.json()["error"]["code"] == "invalid_token"


def test_annotators_reach_neither_admin_routes_nor_each_others_items(fixed):
    url, store = fixed
    store.add_items(0, *make_items(2, tag="-auth"))
    ada, bob = store.invite("auth-ada"), store.invite("auth-bob")
    slot = httpx.get(url + "/api/next", headers=bearer(ada), timeout=30).json()["item"]["slot"]
    for path, body in [("/api/label", {"slot": slot, "choices": {"overall": "left"}}), ("/api/skip", {"slot": slot})]:
        assert httpx.post(url + path, json=body, headers=bearer(bob), timeout=30).status_code == 404
    for path in ("/api/admin/stats", "/api/admin/items"):
        assert httpx.get(url + path, headers=bearer(ada), timeout=30).status_code == 403
        assert httpx.get(url + path, headers=bearer(ADMIN_KEY), timeout=30).status_code == 200
    invite = httpx.post(url + "/api/admin/invite", json={"name": "x"}, headers=bearer(ada), timeout=30)
    assert invite.status_code == 403
    assert httpx.get(url + "/api/next", headers=bearer(ADMIN_KEY), timeout=30).status_code == 403
    saved = httpx.post(url + "/api/label", json={"slot": slot, "choices": {"overall": "left"}}, headers=bearer(ada))
    assert saved.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "multipart/form-data; boundary=x"},
        {"Content-Type": "application/json", "Origin": "http://evil.test"},
        {"Content-Type": "application/json", "Origin": "null"},
        {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"},
        {"Content-Type": "application/json", "Sec-Fetch-Site": "same-site"},
    ],
)
def test_cross_site_posts_are_refused(fixed, headers):
    url, store = fixed
    token = store.invite("csrf-victim")
    resp = httpx.post(url + "/api/undo", content=b"{}", headers={**bearer(token), **headers}, timeout=30)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "csrf"


def test_request_bodies_are_bounded(fixed):
    url, store = fixed
    token = store.invite("big-body")
    body = {"slot": 1, "choices": {"overall": "left"}, "comment": "x" * 5000}
    assert httpx.post(url + "/api/label", json=body, headers=bearer(token), timeout=30).status_code == 413


def test_bad_labels_are_400s(fixed):
    url, store = fixed
    store.add_items(0, *make_items(1, tag="-bad"))
    token = store.invite("bad-labels")
    slot = httpx.get(url + "/api/next", headers=bearer(token), timeout=30).json()["item"]["slot"]
    for choice in ({"overall": "<script>"}, {"quality": "left"}, {"overall": "left", "nope": "left"}):
        resp = httpx.post(url + "/api/label", json={"slot": slot, "choices": choice}, headers=bearer(token))
        assert resp.status_code == 400, choice


def test_items_come_from_the_policy_deployment_and_scores_reach_admins_only(label_servers):
    url, store = label_servers["urls"]["gen"], label_servers["stores"]["gen"]
    token = store.invite("gen-carol")
    nxt = httpx.get(url + "/api/next", headers=bearer(token), timeout=120)
    assert nxt.status_code == 200
    body = nxt.json()
    assert set(body["item"]) == {"slot", "prompt", "left", "right"} and "score" not in nxt.text
    assert body["criteria"] == CRITERIA and 1 <= store.round_items(0) <= 4  # one batch of feedback.batch_size
    items = httpx.get(url + "/api/admin/items", headers=bearer(ADMIN_KEY), timeout=120).json()
    assert items[0]["policy"] == "tiny-policy"
    assert all(isinstance(i["score_a"], float) and isinstance(i["score_b"], float) for i in items)


def _run_annotators(url: str, store, names: list[str], **run) -> list[SimulatedAnnotator]:
    sims = [SimulatedAnnotator(LabelClient(url, store.invite(n)), CRITERIA, seed=i) for i, n in enumerate(names)]
    threads = [threading.Thread(target=s.run, kwargs=run) for s in sims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sims


def _stored(store) -> tuple[set[int], dict[int, int]]:
    """Submission ids in the store, and the number of choice rows of each."""
    with store.engine.connect() as c:
        ids = set(c.execute(select(submissions.c.id)).scalars())
        per = dict(c.execute(select(choices.c.submission_id, func.count()).group_by(choices.c.submission_id)).all())
    return ids, per


def test_simulated_annotators_over_http_and_the_export_trains_a_reward_model(fixed, tmp_path):
    url, store = fixed
    store.add_items(1, *make_items(24, tag="-sim"))
    before, _ = _stored(store)
    open_slots = store.slot_counts()["open"]  # 24, plus any an earlier test left open
    sims = _run_annotators(url, store, ["sim-a", "sim-b", "sim-c"])
    acked = [i for s in sims for i in s.acknowledged]
    after, per = _stored(store)
    assert len(acked) == len(set(acked)) == open_slots and set(acked) == after - before
    assert store.slot_counts(1) == {"open": 0, "claimed": 0, "done": 24}
    assert all(per[i] == 1 + len(CRITERIA) for i in acked)
    path = tmp_path / "export.parquet"
    export(store, path, rounds=[1])
    cfg = load_config("tiny", [f"data.preferences={path}", f"reward_model.path={tmp_path / 'rm'}"])
    metrics = train_rm(cfg)
    assert metrics["train_pairs"] == 24  # one overall pair per label; the simulator never ties
    assert (tmp_path / "rm" / "metrics.json").exists()


def _replica_pid(app: str) -> int:
    """The process of the app's replica (Ray titles it ``ray::ServeReplica:<app>:LabelApp``)."""
    import psutil

    title = f"ray::ServeReplica:{app}:LabelApp"
    found = [p.pid for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith(title)]
    assert len(found) == 1, found
    return found[0]


def test_acknowledged_labels_survive_a_killed_replica(fixed):
    url, store = fixed
    store.add_items(2, *make_items(60, tag="-kill"))
    before, _ = _stored(store)
    stop = threading.Event()
    sims = [
        SimulatedAnnotator(LabelClient(url, store.invite(f"kill-{i}"), retry_s=120), CRITERIA, seed=i) for i in (0, 1)
    ]
    threads = [threading.Thread(target=s.run, kwargs={"stop": stop}) for s in sims]
    for t in threads:
        t.start()
    while sum(len(s.acknowledged) for s in sims) < 10:
        time.sleep(0.05)
    os.kill(_replica_pid("fixed"), signal.SIGKILL)  # mid-stream: requests in flight die with it
    killed_at, t_kill = sum(len(s.acknowledged) for s in sims), time.monotonic()
    while sum(len(s.acknowledged) for s in sims) < killed_at + 10:  # Serve restarts it; the sessions go on
        assert all(t.is_alive() for t in threads), "an annotator gave up"
        time.sleep(0.1)
    print(f"back after {time.monotonic() - t_kill:.1f}s")
    stop.set()
    for t in threads:
        t.join()
    acked = [i for s in sims for i in s.acknowledged]
    after, per = _stored(store)
    assert len(acked) == len(set(acked)) and set(acked) <= after - before  # every acknowledged label is there
    assert all(per.get(i) == 1 + len(CRITERIA) for i in after - before)  # and no partial label anywhere
