"""Access and privacy: which bearer keys are accepted (rotatable without a restart), and what reaches the logs.

:class:`KeyRing` holds the accepted keys: a fixed key (``serve.api_key`` or ``ALIGNRAY_API_KEY``)
and the keys in ``serve.api_keys_file``, one per line, re-read whenever the file's modification
time or size changes (checked at most every ``recheck_s``). Replace the file atomically (write a
new one, rename it over the old). An empty file accepts no key from it; a missing or unreadable
file keeps the last keys read and logs a warning, so a botched rotation does not lock everyone
out or open the server. With neither a fixed key nor a file, the server is open.

:class:`RequestLog` writes nothing by default (Serve's access log already has each request's route,
status and latency). With ``serve.log_requests`` it writes one line per finished request with its
prompts and responses, and with ``serve.log_mask`` (the default) e-mail addresses and digit runs in
them replaced by ``<email>`` and ``<num>``. The logger is a child of ``ray.serve``, so the line goes
to the replica's log with Serve's formatting.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import time
from pathlib import Path

logger = logging.getLogger(__name__)

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
DIGITS = re.compile(r"\d+")


def mask(text: str) -> str:
    """Text with e-mail addresses replaced by ``<email>`` and runs of digits by ``<num>``."""
    return DIGITS.sub("<num>", EMAIL.sub("<email>", text))


def read_keys(path: str | Path) -> set[str]:
    """The keys in a key file: one per line, blank lines and '#' comments skipped."""
    lines = Path(path).read_text().splitlines()
    return {s for line in lines if (s := line.split("#", 1)[0].strip())}


class KeyRing:
    """The accepted bearer keys: a fixed one and/or a key file re-read when it changes."""

    def __init__(self, key: str = "", keys_file: str = "", recheck_s: float = 1.0):
        self.key, self.path, self.recheck_s = key, keys_file, recheck_s
        self._file_keys: set[str] = set()
        self._stamp: tuple[int, int] | None = None
        self._checked = float("-inf")
        if keys_file:
            self._file_keys = read_keys(keys_file)  # a missing file at start is a configuration error
            self._stamp = self._stat()

    @property
    def required(self) -> bool:
        """Whether requests must carry a key at all."""
        return bool(self.key or self.path)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _refresh(self) -> None:
        now = time.monotonic()
        if not self.path or now - self._checked < self.recheck_s:
            return
        self._checked = now
        stamp = self._stat()
        if stamp == self._stamp:
            return
        if stamp is None:  # warned once; re-read when it comes back
            logger.warning(
                "serve.api_keys_file %s is missing; keeping the %d keys read before", self.path, len(self._file_keys)
            )
            self._stamp = None
            return
        try:
            self._file_keys, self._stamp = read_keys(self.path), stamp
        except (OSError, UnicodeDecodeError) as err:
            logger.warning("serve.api_keys_file %s could not be read (%s); keeping the previous keys", self.path, err)

    def accepts(self, token: str) -> bool:
        """Whether ``token`` is an accepted key (constant-time compare against each one)."""
        self._refresh()
        given = token.encode()
        ok = False
        for key in ([self.key] if self.key else []) + sorted(self._file_keys):
            ok |= hmac.compare_digest(given, key.encode())
        return ok


class RequestLog:
    """Prompts and responses of finished requests, in the log only when asked for, masked if asked."""

    def __init__(self, log_requests: bool = False, log_mask: bool = True, name: str = "ray.serve.alignray"):
        self.log_requests, self.log_mask = log_requests, log_mask
        self.logger = logging.getLogger(name)
        if log_requests:
            self.logger.setLevel(logging.INFO)

    def record(self, request_id: str, route: str, prompts: list[str], texts: list[str], **facts) -> None:
        """Log a finished request (its facts, prompts and responses) when log_requests is on; else nothing."""
        if not self.log_requests:
            return
        clean = mask if self.log_mask else str
        entry = {"id": request_id, "route": route, **facts}
        entry["prompts"], entry["responses"] = [clean(p) for p in prompts], [clean(t) for t in texts]
        self.logger.info("request %s", json.dumps(entry, ensure_ascii=False))
