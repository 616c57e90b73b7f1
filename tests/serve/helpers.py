"""Helpers shared by the serve tests that run real HTTP: ports, Ray on loopback, SSE parsing, error checks."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import httpx
import ray

from tests.fixtures.ports import free_port  # noqa: F401 - re-exported for the serve tests


def start_ray(num_cpus: int = 4, fast_metrics: bool = False) -> None:
    """A fresh local Ray (never someone else's cluster), optionally reporting metrics every second."""
    config = {"metrics_report_interval_ms": 1000} if fast_metrics else None
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _system_config=config)


def metrics_text() -> str:
    """What this node's Prometheus endpoint serves now."""
    port = ray.nodes()[0]["MetricsExportPort"]
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def wait_for_metrics(pattern: str, timeout: float = 30.0) -> str:
    """Poll the endpoint until a line matches ``pattern`` (regex, multiline); return the whole text."""
    deadline, text = time.time() + timeout, ""
    while time.time() < deadline:
        text = metrics_text()
        if re.search(pattern, text, re.M):
            return text
        time.sleep(0.5)
    names = sorted({line.split("{")[0] for line in text.splitlines() if line.startswith("ray_alignray")})
    raise AssertionError(f"no metrics line matches {pattern!r} after {timeout} s; alignray series: {names}")


def sse_events(response: httpx.Response) -> list:
    """Parse a server-sent-event stream into JSON payloads (and the final '[DONE]')."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    """The response has this status and OpenAI's error body (with this param and code, when given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def wait_until(check, timeout: float = 30.0, every: float = 0.1):
    """Call ``check`` until it returns something truthy (returned) or the time is up (AssertionError)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if out := check():
            return out
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")
