"""Autoscaling, live: sustained load makes Serve add a policy replica and idle time removes it.

A local Ray on loopback serves a tiny model with ``serve.min_replicas=1``, ``serve.max_replicas=2``
and one ongoing request as the target per replica; the delays are short (``upscale_delay_s=0``,
``downscale_delay_s=2``, load reported every 0.5 s over a 1 s window) so the test takes about a
minute. Six clients keep long completions in flight; the replica counts are read from
``serve.status()`` (replicas in the RUNNING state), never assumed.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import ray
from ray import serve

from cluster.config import load_config
from cluster.serving import start_app
from tests.serve.helpers import free_port, start_ray, wait_until

APP, DEPLOYMENT = "scaled", "PolicyServer"


@pytest.fixture(scope="module")
def url(tiny_policy_dir):
    cfg = load_config(
        None,
        [
            f"serve.port={free_port()}",
            "serve.num_cpus_per_replica=0.5",
            "serve.max_tokens_limit=250",
            "serve.min_replicas=1",
            "serve.max_replicas=2",
            "serve.target_ongoing_requests=1",
            "serve.upscale_delay_s=0",
            "serve.downscale_delay_s=2",
            "serve.autoscaling_metrics_interval_s=0.5",
            "serve.look_back_period_s=1",
        ],
    )
    start_ray(num_cpus=4)
    try:
        yield start_app(tiny_policy_dir, cfg, name=APP, route_prefix="/")
    finally:
        serve.shutdown()
        ray.shutdown()


def running_replicas() -> int:
    """RUNNING replicas of the policy deployment, as Serve reports them."""
    return serve.status().applications[APP].deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


def test_load_adds_a_replica_and_idle_removes_it(url):
    assert running_replicas() == 1
    stop, served = threading.Event(), []

    def client(i: int) -> None:
        body = {"model": "tiny-policy", "prompt": "the film was", "max_tokens": 240, "ignore_eos": True, "seed": i}
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                served.append(c.post(url + "/v1/completions", json=body).status_code)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    start = time.time()
    for t in clients:
        t.start()
    try:
        wait_until(lambda: running_replicas() == 2, timeout=90, every=0.5)
        scaled_up = time.time() - start
    finally:
        stop.set()
        for t in clients:
            t.join(60)
    idle = time.time()
    wait_until(lambda: running_replicas() == 1, timeout=90, every=0.5)
    scaled_down = time.time() - idle
    assert served and set(served) == {200}, set(served)
    print(f"1 -> 2 replicas after {scaled_up:.1f} s of load, 2 -> 1 after {scaled_down:.1f} s idle")
