"""Training metrics on the same Prometheus endpoint as serving: one Ray gauge per per-iteration metric.

:func:`publish_training_metrics` sets ``alignray_train_<name>`` (exported as ``ray_alignray_train_<name>``)
for every finite number of an iteration's metrics (``cluster.run_log.summarize``'s row). It needs a
connected Ray (the training driver is); without one it does nothing. Ray drops a gauge that is not
re-set within two report intervals (20 s by default) and an iteration often takes longer, so a
daemon thread re-sets the last values every ``REFRESH_S`` until the process exits. The gauges belong
to the Ray session that created them: after ``ray.shutdown`` and a new ``ray.init`` in the same
process they are created again (a gauge of the old session would export nothing).

``cluster.train`` calls it after every iteration, with the row it writes to ``metrics.csv``.
"""

from __future__ import annotations

import math
import re
import threading

import ray

REFRESH_S = 5.0
PREFIX = "alignray_train_"

_lock = threading.Lock()
_gauges: dict[str, object] = {}
_values: dict[str, float] = {}
_refresher: threading.Thread | None = None
_session: str | None = None


def metric_name(key: str) -> str:
    """The Ray metric name of a training metric (``kl_ref`` -> ``alignray_train_kl_ref``)."""
    return PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", key).lower()


def publish_training_metrics(metrics: dict[str, float]) -> None:
    """Export one iteration's metrics as Prometheus gauges through Ray (non-finite values are skipped)."""
    if not ray.is_initialized():
        return
    from ray.util.metrics import Gauge

    global _refresher, _session
    with _lock:
        session = ray.get_runtime_context().get_worker_id()
        if session != _session:  # a new Ray session: the old gauges are dead, and so are their values
            _gauges.clear()
            _values.clear()
            _session = session
        for key, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(value):
                _values.pop(key, None)  # NaN this iteration: stop exporting the stale value
                continue
            if key not in _gauges:
                _gauges[key] = Gauge(metric_name(key), description=f"Training metric {key!r} of the latest iteration.")
            _values[key] = value
        _set_all()
        if _refresher is None:
            _refresher = threading.Thread(target=_refresh, name="alignray-train-metrics", daemon=True)
            _refresher.start()


def _set_all() -> None:
    for key, value in _values.items():
        _gauges[key].set(value)


def _refresh() -> None:
    """Re-set the last values periodically, so the gauges outlive Ray's eviction between iterations."""
    stop = threading.Event()
    while not stop.wait(REFRESH_S):
        with _lock:
            if ray.is_initialized() and ray.get_runtime_context().get_worker_id() == _session:
                _set_all()
