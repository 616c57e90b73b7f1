"""Access and privacy without Ray: rotating keys from a file, masked request logs (off by default), the middlewares."""

from __future__ import annotations

import logging
import os

import pytest
from fastapi.testclient import TestClient

from serve.access import KeyRing, RequestLog, mask, read_keys
from serve.http import make_app
from serve.metrics import route_label
from serve.scheduler import QueueFull
from serve.settings import ServeSettings


def write(path, text: str) -> None:
    """Replace a file atomically (the documented way to rotate keys), with a fresh modification time."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_key_file_rotates_without_a_restart(tmp_path):
    path = tmp_path / "keys"
    write(path, "# accepted keys\nold-key\n\nshared  # with a comment\n")
    assert read_keys(path) == {"old-key", "shared"}
    ring = KeyRing(keys_file=str(path), recheck_s=0)
    assert ring.required and ring.accepts("old-key") and ring.accepts("shared") and not ring.accepts("new-key")
    write(path, "new-key\nshared\n")
    assert ring.accepts("new-key") and not ring.accepts("old-key")
    path.unlink()  # a botched rotation keeps the last keys rather than locking out or opening up
    assert ring.accepts("new-key") and not ring.accepts("")
    write(path, "")
    assert not ring.accepts("new-key") and not ring.accepts("")  # an empty file accepts nobody


def test_fixed_key_and_open_server(tmp_path):
    assert not KeyRing().required
    ring = KeyRing(key="fixed")
    assert ring.accepts("fixed") and not ring.accepts("fixe") and not ring.accepts("")
    with pytest.raises(FileNotFoundError):
        KeyRing(keys_file=str(tmp_path / "missing"))


def test_mask_hides_emails_and_numbers():
    assert mask("mail jane.doe+x@mail.example.org or call 0123 456") == "mail <email> or call <num> <num>"
    assert mask("no secrets") == "no secrets"


def test_request_logging_is_off_by_default(caplog):
    assert ServeSettings().log_requests is False and ServeSettings().log_mask is True
    caplog.set_level(logging.DEBUG)
    RequestLog().record("cmpl-1", "/v1/completions", ["my secret prompt"], ["a private answer"], tokens=[3])
    assert "secret" not in caplog.text and "private" not in caplog.text and not caplog.records


def test_request_logging_when_asked_masks_by_default(caplog):
    caplog.set_level(logging.INFO)
    RequestLog(log_requests=True).record("cmpl-2", "/v1/completions", ["write to bob@example.com"], ["call 555 1234"])
    assert "<email>" in caplog.text and "<num> <num>" in caplog.text
    assert "bob@example.com" not in caplog.text and "555" not in caplog.text and "cmpl-2" in caplog.text
    caplog.clear()
    RequestLog(log_requests=True, log_mask=False).record("cmpl-3", "/v1/chat/completions", ["bob@example.com"], ["x"])
    assert "bob@example.com" in caplog.text


class FakeMetrics:
    def __init__(self):
        self.seen = []

    def request(self, route, code, seconds):
        self.seen.append((route, code))


@pytest.fixture
def client(tmp_path):
    app = make_app()

    @app.post("/v1/completions")
    async def full():
        raise QueueFull("queue full", retry_after_s=3)

    @app.get("/healthz")
    async def health():
        return {"status": "ok"}

    path = tmp_path / "keys"
    write(path, "k1\n")
    app.state.keys = KeyRing(keys_file=str(path), recheck_s=0)
    app.state.max_request_bytes = 2048
    app.state.metrics = FakeMetrics()
    with TestClient(app) as c:
        c.keys_path = path
        yield c


def test_guard_and_metrics_middlewares(client):
    auth = {"Authorization": "Bearer k1"}
    assert client.get("/healthz").status_code == 200  # probes need no key
    assert client.post("/v1/completions", json={}).status_code == 401
    r = client.post("/v1/completions", json={}, headers=auth)
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
    assert client.post("/v1/completions", content=b"x" * 4096, headers=auth).status_code == 413
    write(client.keys_path, "k2\n")
    assert client.post("/v1/completions", json={}, headers=auth).status_code == 401
    assert client.post("/v1/completions", json={}, headers={"Authorization": "Bearer k2"}).status_code == 429
    assert client.get("/v1/nothing/here", headers={"Authorization": "Bearer k2"}).status_code == 404
    assert client.app.state.metrics.seen == [
        ("/healthz", 200),
        ("/v1/completions", 401),
        ("/v1/completions", 429),
        ("/v1/completions", 413),
        ("/v1/completions", 401),
        ("/v1/completions", 429),
        ("other", 404),
    ]


def test_route_labels_are_bounded():
    assert route_label("/open/v1/completions", "/open") == "/v1/completions"
    assert route_label("/v1/models/tiny-policy") == "/v1/models"
    assert route_label("/v1/../../etc/passwd") == "other"
