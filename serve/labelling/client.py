"""A small HTTP client of the labelling API, sending what the page's script sends (stdlib only, keep-alive).

A request that fails in transport (server restarting) is retried until ``retry_s`` runs out;
``label`` sends the same ``request_id`` each time, so a label whose answer was lost is stored once.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from urllib.parse import urlsplit

RETRY_STATUSES = {500, 502, 503, 504}


class LabelAPIError(RuntimeError):
    """The app answered with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


class LabelClient:
    """One annotator's session against ``base_url`` (e.g. http://127.0.0.1:8000/label)."""

    def __init__(self, base_url: str, token: str, timeout: float = 60.0, retry_s: float = 120.0):
        url = urlsplit(base_url)
        self.host, self.port, self.prefix = url.hostname, url.port or 80, url.path.rstrip("/")
        self.origin = f"{url.scheme}://{url.netloc}"
        self.token, self.timeout, self.retry_s = token, timeout, retry_s
        self.conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _once(self, method: str, path: str, body: dict | None) -> tuple[int, dict, bool]:
        """(status, body, whether the app itself answered: its answers are JSON, the proxy's are text)."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:  # what a same-origin fetch from the page sends
            data = json.dumps(body).encode()
            headers.update({"Content-Type": "application/json", "Origin": self.origin, "Sec-Fetch-Site": "same-origin"})
        try:
            self.conn.request(method, self.prefix + path, body=data, headers=headers)
            resp = self.conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        try:
            return resp.status, (json.loads(raw) if raw else {}), True
        except ValueError:  # Serve's proxy answers in plain text
            return resp.status, {"error": {"message": raw.decode(errors="replace")[:200]}}, False

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """JSON in, JSON out; transport failures are retried, an error status raises LabelAPIError."""
        deadline = time.monotonic() + self.retry_s
        while True:
            try:
                status, out, from_app = self._once(method, path, body)
            except (OSError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                continue
            # Serve's proxy answers 5xx while a replica is lost or restarting, and a plain-text 404 while a
            # restarted Serve has not deployed the app yet; every route is safe to repeat (a label
            # carries its request_id), so wait for the app to come back.
            transient = status in RETRY_STATUSES or (status == 404 and not from_app)
            if transient and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            if status >= 400:
                raise LabelAPIError(status, out.get("error", {}).get("message", str(out)))
            return out

    def me(self) -> dict:
        return self.request("GET", "/api/me")

    def next(self) -> dict:
        """The item to label ({'item': None, ...} when nothing is left)."""
        return self.request("GET", "/api/next")

    def label(self, slot: int, choices: dict[str, str], comment: str = "", request_id: str | None = None) -> dict:
        """Submit a label; returns {'label': id, 'progress': ...} once it is committed."""
        body = {"slot": slot, "choices": choices, "comment": comment, "request_id": request_id or uuid.uuid4().hex}
        return self.request("POST", "/api/label", body)

    def skip(self, slot: int) -> dict:
        return self.request("POST", "/api/skip", {"slot": slot})

    def undo(self) -> dict:
        return self.request("POST", "/api/undo", {})
