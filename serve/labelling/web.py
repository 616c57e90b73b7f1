"""Browser-facing plumbing of the labelling app: the cross-site request guard, security headers, the static page.

Credentials never ride along by themselves: the page keeps the personal token (from the link's
``#t=`` fragment, which browsers do not send to servers) and sends it as ``Authorization:
Bearer``, so a cross-site form or fetch carries no credential. :class:`CrossSiteGuard` refuses
unsafe requests that are not JSON or come from another origin anyway (defence in depth, and the
rule for any future cookie). Model text reaches the page only through ``textContent`` under a
Content-Security-Policy that allows no inline script.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

STATIC = Path(__file__).parent / "static"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html; charset=utf-8"}


def cross_site_reason(scope: dict, headers: dict[str, str], allowed_origins: frozenset[str]) -> str | None:
    """Why an unsafe-method request must be refused, or None.

    HTML forms cannot send ``application/json``, and a cross-origin fetch that does needs a CORS
    preflight this app never grants. Browsers send ``Sec-Fetch-Site`` and ``Origin`` with POSTs;
    clients that are not browsers send neither and pass.
    """
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        return "the request body must be JSON sent with 'Content-Type: application/json'"
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {site})"
    origin = headers.get("origin")
    if origin is not None:
        own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}"
        if origin != own and origin not in allowed_origins:  # "null" (sandboxed frames, file:) never matches
            return f"cross-origin request refused (Origin: {origin})"
    return None


class CrossSiteGuard:
    """Plain ASGI middleware: refuses unsafe cross-site requests before routing or body parsing (403)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            allowed = getattr(scope["app"].state, "allowed_origins", frozenset())
            reason = cross_site_reason(scope, headers, allowed)
            if reason:
                body = json.dumps({"error": {"message": reason, "type": "invalid_request_error", "code": "csrf"}})
                raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 403, "headers": raw})
                await send({"type": "http.response.body", "body": body.encode()})
                return
        await self.app(scope, receive, send)


@cache
def asset(name: str) -> tuple[str, str]:
    """(text, media type) of a static file; KeyError for anything not shipped."""
    path = STATIC / name
    if "/" in name or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise KeyError(name)
    return path.read_text(), MEDIA_TYPES[path.suffix]


def page(name: str, root: str) -> str:
    """An HTML page with the route prefix filled in (the prefix is ours, never user input)."""
    text, _ = asset(name)
    return text.replace("{{root}}", json.dumps(root)[1:-1].replace("<", "\\u003c").replace('"', "&quot;"))
