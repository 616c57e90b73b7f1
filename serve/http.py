"""HTTP plumbing shared by the routes: API-key auth, a request-size bound, OpenAI-style errors.

:func:`make_app` returns the FastAPI app the deployment is wrapped in. Its settings live on
``app.state`` (``keys``, a :class:`~serve.access.KeyRing`; ``max_request_bytes``; ``metrics``)
and are filled in by the deployment's constructor on each replica, so one module-level app
serves any configuration.

- :class:`MetricsMiddleware` (outermost): every answer, the guard's 401/413 included, counts in
  ``alignray_requests{route,code}`` and ``alignray_request_latency_seconds`` (to the last byte).
- :class:`GuardMiddleware` (plain ASGI, runs before routing and body parsing): a missing or
  wrong ``Authorization: Bearer <key>`` gets 401 when keys are configured (``/healthz`` stays
  open for probes); a body over ``max_request_bytes`` gets 413, whether it announces its length
  or is chunked.
- Exception handlers turn every error into OpenAI's body
  ``{"error": {"message", "type", "param", "code"}}``: validation errors (malformed JSON,
  unknown fields, out-of-range values) are 400s naming the field, unknown routes 404,
  :class:`~serve.engine.InputError` 400, a full queue (:class:`~serve.scheduler.QueueFull`) 429
  with ``Retry-After``, and only a genuine bug a 500.
"""

from __future__ import annotations

import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.access import KeyRing
from serve.engine import InputError
from serve.metrics import route_label
from serve.protocol import APIError
from serve.scheduler import QueueFull

logger = logging.getLogger(__name__)


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body with the error's status (and its headers, e.g. Retry-After)."""
    return JSONResponse(err.body(), status_code=err.status, headers={**(err.headers or {}), **(headers or {})})


async def _send_error(send, err: APIError, headers: dict[str, str] | None = None) -> None:
    """Send an error response from raw ASGI (before the app has seen the request)."""
    body = json.dumps(err.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _bearer_ok(headers: dict[bytes, bytes], keys: KeyRing) -> bool:
    """Whether the Authorization header carries ``Bearer <an accepted key>``."""
    value = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    return scheme.lower() == "bearer" and keys.accepts(token.strip())


class MetricsMiddleware:
    """ASGI middleware: count every answer by route and status, and time it to its last byte."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        metrics = getattr(scope["app"].state, "metrics", None) if scope["type"] == "http" else None
        if metrics is None:
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            route = route_label(scope["path"], scope.get("root_path", ""))
            metrics.request(route, status, time.perf_counter() - start)


class GuardMiddleware:
    """ASGI middleware: API-key check, then the request-size bound (the body is buffered once)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope["app"].state
        headers = dict(scope["headers"])
        keys: KeyRing | None = getattr(state, "keys", None)
        if (
            keys
            and keys.required
            and not scope["path"].rstrip("/").endswith("/healthz")
            and not _bearer_ok(headers, keys)
        ):
            err = APIError(
                401,
                "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
            return await _send_error(send, err, {"www-authenticate": "Bearer"})
        limit = getattr(state, "max_request_bytes", 1_000_000)
        too_big = APIError(
            413,
            f"Request body is larger than this server's limit of {limit} bytes (serve.max_request_bytes).",
            code="request_too_large",
        )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(send, too_big)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await _send_error(send, too_big)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_field(part: str) -> bool:
    """Whether a validation-error location part is a field name (not a union tag like 'list[str]')."""
    return part.isidentifier() and part == part.lower() and part not in _TYPE_TAGS


def _validation_message(err: dict) -> tuple[str, str | None]:
    """(message, param) for one pydantic/FastAPI validation error."""
    loc = [str(x) for x in err.get("loc", ())[1:] if isinstance(x, int) or _is_field(x)]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return (
            f"We could not parse the JSON body of your request: {err.get('ctx', {}).get('error', err.get('msg'))}",
            None,
        )
    if not loc:  # the body as a whole
        if kind == "missing":
            return "The request body is empty: send a JSON object.", None
        if isinstance(err.get("input"), (bytes, str)):
            return "The request body must be JSON sent with 'Content-Type: application/json'.", None
        return "The request body must be a JSON object.", None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return f"Missing required parameter: {param}", param
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"Invalid value for '{param}': {msg}" if param else msg), param


def make_app() -> FastAPI:
    """The FastAPI app with the guard middleware and OpenAI-style error handlers (routes added by the deployment)."""
    app = FastAPI(title="alignray", docs_url=None, redoc_url=None)
    app.state.keys = None
    app.state.max_request_bytes = 1_000_000
    app.state.metrics = None
    app.add_middleware(GuardMiddleware)
    app.add_middleware(MetricsMiddleware)  # added last = outermost: it sees the guard's answers too

    def openapi() -> dict:
        """FastAPI's schema without the 422 it adds to every route: invalid input is a 400 here."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors() or [{"msg": "invalid request"}]
        message, param = _validation_message(errors[0])
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = (
            f"{exc.detail}: {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        )
        return error_response(APIError(exc.status_code, message, code=code), headers=getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull):
        retry = {"retry-after": str(exc.retry_after_s)}
        return error_response(APIError(429, str(exc), type="rate_limit_error", code="queue_full", headers=retry))

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError):
        return error_response(APIError(400, str(exc), param=exc.param, code=exc.code))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(
            APIError(500, f"The server had an error while processing your request: {exc!r}", type="server_error")
        )

    return app
