"""The policy deployment's Prometheus metrics, recorded through Ray Serve's metrics API.

Ray exports them at every node's metrics endpoint (``http://<node>:<metrics_export_port>/metrics``,
``ray start --metrics-export-port``) with the prefix ``ray_``; a counter gets ``_total``, a
histogram ``_bucket``/``_sum``/``_count``, and Serve adds the ``application``, ``deployment`` and
``replica`` labels. :data:`METRICS` is the catalogue: the dashboard and alert rules in
``cluster/manifests`` may only use names it exports (a test checks), see :func:`exported_names`.

Gauges are re-set at least once a second by the generation loop, also when idle: Ray drops a
gauge that is not refreshed within two report intervals.
"""

from __future__ import annotations

import math
import time
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

LATENCY_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
FIRST_TOKEN_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
REWARD_PROBABILITY = [round(0.05 * k, 2) for k in range(1, 20)]  # 0.05 .. 0.95 (Ray wants positive boundaries)
REWARD_WINDOW = 100

METRICS: dict[str, tuple[Kind, str, tuple[str, ...], list[float] | None]] = {
    "alignray_requests": ("counter", "HTTP requests answered, by route and status code.", ("route", "code"), None),
    "alignray_request_latency_seconds": (
        "histogram",
        "Seconds from a request's arrival at the replica to its last byte, by route.",
        ("route",),
        LATENCY_S,
    ),
    "alignray_time_to_first_token_seconds": (
        "histogram",
        "Seconds from arrival to the first generated token (queue wait plus prefill), by route.",
        ("route",),
        FIRST_TOKEN_S,
    ),
    "alignray_queue_wait_seconds": (
        "histogram",
        "Seconds a request waited for a batch slot.",
        (),
        FIRST_TOKEN_S,
    ),
    "alignray_generated_tokens": ("counter", "Completion tokens generated (cancelled requests included).", (), None),
    "alignray_decode_steps": ("counter", "Decoding steps run by the generation loop.", (), None),
    "alignray_decoded_rows": ("counter", "Sequences decoded, summed over steps (/ steps = mean batch rows).", (), None),
    "alignray_queue_length": ("gauge", "Sequences waiting for a batch slot now.", (), None),
    "alignray_queue_limit": ("gauge", "serve.max_queue: sequences that may wait before requests get 429.", (), None),
    "alignray_running_sequences": ("gauge", "Sequences in the running batch now.", (), None),
    "alignray_batch_occupancy": ("gauge", "Running sequences / serve.max_batch_size, now.", (), None),
    "alignray_reward_probability": (
        "histogram",
        "sigmoid(normalised reward-model score) of served responses (0.5 = the mean of the reward model's training "
        "responses); a sample, serve.reward_sample_rate.",
        (),
        REWARD_PROBABILITY,
    ),
    "alignray_reward_score_mean": (
        "gauge",
        f"Mean normalised reward-model score of the last {REWARD_WINDOW} scored responses on this replica.",
        (),
        None,
    ),
}
"""name -> (kind, description, tag keys, histogram boundaries)."""

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/rewards", "/healthz")


def exported_names(name: str, kind: Kind) -> set[str]:
    """The Prometheus series names Ray exports for one metric."""
    base = "ray_" + name
    if kind == "counter":
        return {base + "_total"}
    if kind == "histogram":
        return {base + "_bucket", base + "_sum", base + "_count"}
    return {base}


def route_label(path: str, root_path: str = "") -> str:
    """A bounded route label for a request path (unknown paths are 'other', model ids are dropped)."""
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    path = path.rstrip("/") or "/"
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return path if path in ROUTES else "other"


class ServeMetrics:
    """The metrics of one replica (create it in the replica: Serve labels them with its identity)."""

    def __init__(self, max_batch_size: int, max_queue: int, report_every_s: float = 0.25):
        from ray.serve import metrics as serve_metrics

        make = {"counter": serve_metrics.Counter, "gauge": serve_metrics.Gauge, "histogram": serve_metrics.Histogram}
        self.m = {}
        for name, (kind, description, tags, bounds) in METRICS.items():
            extra = {"boundaries": bounds} if bounds else {}
            self.m[name] = make[kind](name, description=description, tag_keys=tags, **extra)
        self.max_batch_size, self.max_queue, self.report_every_s = max_batch_size, max_queue, report_every_s
        self._last_report, self._steps, self._rows = 0.0, 0, 0
        self._scores: list[float] = []

    def request(self, route: str, code: int, seconds: float) -> None:
        """One answered request."""
        self.m["alignray_requests"].inc(tags={"route": route, "code": str(code)})
        self.m["alignray_request_latency_seconds"].observe(seconds, tags={"route": route})

    def generation(self, route: str, first_token_s: float | None, queue_wait_s: float | None, tokens: int) -> None:
        """One finished (or cancelled) generation request: its time to first token, queue wait and tokens."""
        if first_token_s is not None:
            self.m["alignray_time_to_first_token_seconds"].observe(first_token_s, tags={"route": route})
        if queue_wait_s is not None:
            self.m["alignray_queue_wait_seconds"].observe(queue_wait_s)
        if tokens > 0:
            self.m["alignray_generated_tokens"].inc(tokens)

    def rewards(self, scores: list[float]) -> None:
        """Normalised reward-model scores of served responses."""
        for s in scores:
            self.m["alignray_reward_probability"].observe(1.0 / (1.0 + math.exp(-float(s))))
        self._scores = (self._scores + [float(s) for s in scores])[-REWARD_WINDOW:]

    def loop(self, queued: int, running: int, steps: int, row_steps: int) -> None:
        """The generation loop's state (throttled to one report per report_every_s)."""
        now = time.monotonic()
        if now - self._last_report < self.report_every_s:
            return
        self._last_report = now
        self.m["alignray_queue_length"].set(queued)
        self.m["alignray_queue_limit"].set(self.max_queue)
        self.m["alignray_running_sequences"].set(running)
        self.m["alignray_batch_occupancy"].set(running / self.max_batch_size)
        if self._scores:  # re-set with the others: Ray drops a gauge that is not refreshed
            self.m["alignray_reward_score_mean"].set(sum(self._scores) / len(self._scores))
        if steps > self._steps:
            self.m["alignray_decode_steps"].inc(steps - self._steps)
            self.m["alignray_decoded_rows"].inc(row_steps - self._rows)
            self._steps, self._rows = steps, row_steps
