"""Operating the policy server over real HTTP: continuous vs static batching, queue bound, cancel, dtypes, keys, logs, metrics.

One Ray on loopback (metrics reported every second) serves three applications of a tiny model:
- ``cont`` at ``/cont``: continuous batching of up to 4 sequences, float32, a reward model attached
  (every served response scored for the drift metric), request logging off (the default);
- ``static`` at ``/static``: static batching of up to 8 sequences, bfloat16;
- ``tight`` at ``/tight``: one slot and a one-sequence queue, int8, keys from a rotatable file,
  request logging on (masked).
"""

from __future__ import annotations

import os
import random
import re
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from cluster.config import load_config
from cluster.serving import start_app
from cluster.telemetry import publish_training_metrics
from serve.quantize import resolve_dtype
from tests.serve.helpers import (
    assert_error,
    free_port,
    metrics_text,
    sse_events,
    start_ray,
    wait_for_metrics,
    wait_until,
)

MODEL = "tiny-policy"
MANIFESTS = Path(__file__).resolve().parents[2] / "cluster" / "manifests"
LONG = 240  # tokens: long enough to still be running when the next request arrives


def write_keys(path: Path, *keys: str) -> None:
    """Rotate the key file the documented way: write a new file, rename it over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text("\n".join(keys) + "\n")
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def server(tiny_policy_dir, tiny_reward_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    write_keys(keys, "k1")
    port = free_port()
    common = [f"serve.port={port}", "serve.max_tokens_limit=250", "serve.num_cpus_per_replica=0.5"]
    apps = {
        "cont": (["serve.max_batch_size=4", "serve.max_queue=8"], tiny_reward_dir),
        "static": (["serve.batching=static", "serve.max_batch_size=8", "serve.dtype=bfloat16"], None),
        "tight": (
            ["serve.max_batch_size=1", "serve.max_queue=1", "serve.dtype=int8", f"serve.api_keys_file={keys}"]
            + ["serve.log_requests=true"],
            None,
        ),
    }
    start_ray(num_cpus=4, fast_metrics=True)
    try:
        urls = {
            name: start_app(tiny_policy_dir, load_config(None, common + extra), rm, name=name, route_prefix=f"/{name}")
            for name, (extra, rm) in apps.items()
        }
        yield {**urls, "keys": keys}
    finally:
        serve.shutdown()
        ray.shutdown()


def body(**kw) -> dict:
    return {"model": MODEL, "prompt": "the film was", **kw}


def health(url: str) -> dict:
    return httpx.get(url + "/healthz", timeout=30).json()["batching"]


def join_mid_generation(url: str, headers: dict | None = None) -> tuple[float, float, float, httpx.Response]:
    """Stream a long request; once its first token arrives, send a short one. -> (short sent, long end, short end, short)."""
    out = {}

    def short() -> None:
        out["sent"] = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json=body(max_tokens=3, ignore_eos=True), headers=headers, timeout=60)
        out["end"], out["response"] = time.perf_counter(), r

    with httpx.stream(
        "POST", url + "/v1/completions", json=body(max_tokens=LONG, ignore_eos=True, stream=True), timeout=60
    ) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        thread = threading.Thread(target=short)
        thread.start()
        for _ in lines:
            pass
        long_end = time.perf_counter()
    thread.join(60)
    return out["sent"], long_end, out["end"], out["response"]


def test_models_report_the_served_dtype(server):
    for name, dtype in (("cont", resolve_dtype("auto")), ("static", "bfloat16"), ("tight", "int8")):
        headers = {"Authorization": "Bearer k1"} if name == "tight" else {}
        models = httpx.get(server[name] + "/v1/models", headers=headers, timeout=30)
        assert models.status_code == 200, (name, models.text)
        card = models.json()["data"][0]
        assert card["id"] == MODEL and card["dtype"] == dtype
        # ignore_eos: the random tiny model samples its end-of-text token first now and then (CI saw 0 tokens once)
        r = httpx.post(
            server[name] + "/v1/completions", json=body(max_tokens=5, ignore_eos=True), headers=headers, timeout=30
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5, (name, r.text)


def test_continuous_a_request_arriving_mid_generation_starts_before_the_first_finishes(server):
    sent, long_end, short_end, short = join_mid_generation(server["cont"])
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
    assert short_end < long_end  # joined the running batch, finished and left while the long one decoded
    assert short.headers["x-alignray-batch-size"] == "2"
    assert float(short.headers["x-alignray-queue-ms"]) / 1000 < 0.5 * (long_end - sent)


def test_static_a_request_arriving_mid_generation_waits_for_the_batch(server):
    sent, long_end, _, short = join_mid_generation(server["static"])
    assert short.status_code == 200 and short.headers["x-alignray-batch-size"] == "1"
    # The server's own clock: it waited out the long batch. (Comparing the two clients' end times
    # raced: the long stream's close can reach the client after a 3-token answer on a tiny model.)
    assert float(short.headers["x-alignray-queue-ms"]) / 1000 > 0.5 * (long_end - sent)
    assert health(server["static"])["mode"] == "static"


def test_streamed_tokens_arrive_in_order_and_match_the_non_streamed_result(server):
    request = body(max_tokens=24, n=2, temperature=1.0, top_p=0.9, seed=42)
    other = threading.Thread(  # another request in the batch must not change the sampled text
        target=httpx.post, args=(server["cont"] + "/v1/completions",), kwargs={"json": body(max_tokens=LONG)}
    )
    other.start()
    whole = httpx.post(server["cont"] + "/v1/completions", json=request, timeout=60).json()
    with httpx.stream("POST", server["cont"] + "/v1/completions", json={**request, "stream": True}, timeout=60) as r:
        events = sse_events(r)
    other.join(60)
    assert events[-1] == "[DONE]"
    streamed, ended = ["", ""], set()
    for event in events[:-1]:
        for choice in event["choices"]:
            assert choice["index"] not in ended  # nothing after a choice's last chunk
            streamed[choice["index"]] += choice["text"]
            if choice["finish_reason"]:
                ended.add(choice["index"])
    assert ended == {0, 1} and streamed == [c["text"] for c in whole["choices"]] and streamed[0] != streamed[1]


def test_a_cancelled_stream_frees_its_slot(server):
    url, auth = server["tight"], {"Authorization": "Bearer k1"}
    before = health(url)["cancelled"]
    long = body(max_tokens=LONG, ignore_eos=True, stream=True)
    with httpx.stream("POST", url + "/v1/completions", json=long, headers=auth, timeout=60) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    # the client hung up after one token: the slot is free again long before 240 tokens were written
    stats = wait_until(lambda: (s := health(url))["cancelled"] == before + 1 and s["running"] == 0 and s, timeout=20)
    assert stats["waiting"] == 0
    r = httpx.post(url + "/v1/completions", json=body(max_tokens=4), headers=auth, timeout=30)
    assert r.status_code == 200


def test_a_full_queue_answers_429_with_retry_after(server):
    """One slot and a one-sequence queue: of six long requests sent at once, the ones that find both taken get 429."""
    url, auth = server["tight"], {"Authorization": "Bearer k1"}
    before = health(url)["rejected"]
    barrier = threading.Barrier(6)

    def send(i: int) -> httpx.Response:
        barrier.wait()
        return httpx.post(
            url + "/v1/completions", json=body(max_tokens=LONG, ignore_eos=True), headers=auth, timeout=60
        )

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(send, range(6)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) == {200, 429}, codes
    for r in responses:
        if r.status_code == 429:
            assert_error(r, 429, code="queue_full")
            assert 1 <= int(r.headers["retry-after"]) <= 60
    assert health(url)["rejected"] == before + codes.count(429)


def test_keys_rotate_without_a_restart(server):
    url = server["tight"] + "/v1/models"
    assert httpx.get(url, headers={"Authorization": "Bearer k1"}, timeout=30).status_code == 200
    write_keys(server["keys"], "k2", "k3")
    wait_until(lambda: httpx.get(url, headers={"Authorization": "Bearer k1"}, timeout=30).status_code == 401)
    assert httpx.get(url, headers={"Authorization": "Bearer k2"}, timeout=30).status_code == 200
    write_keys(server["keys"], "k1")
    wait_until(lambda: httpx.get(url, headers={"Authorization": "Bearer k1"}, timeout=30).status_code == 200)


def _logs_containing(marker: str) -> list[str]:
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    hits = []
    for path in logs.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err"):
            hits += [line for line in path.read_text(errors="replace").splitlines() if marker in line]
    return hits


def test_prompts_reach_the_logs_only_when_asked_and_masked(server):
    word = lambda: "quokka" + "".join(random.choices(string.ascii_lowercase, k=10))  # noqa: E731
    quiet, loud = word(), word()
    prompt = "{} mail me at jane{}@example.com or call 5551234"
    r = httpx.post(server["cont"] + "/v1/completions", json=body(prompt=prompt.format(quiet, 7), max_tokens=3))
    assert r.status_code == 200
    r = httpx.post(
        server["tight"] + "/v1/completions",
        json=body(prompt=prompt.format(loud, 7), max_tokens=3),
        headers={"Authorization": "Bearer k1"},
    )
    assert r.status_code == 200
    lines = wait_until(lambda: _logs_containing(loud), timeout=30)
    for line in lines:  # the replica's log, and the worker's stderr it is mirrored to
        assert "<email>" in line and "<num>" in line and "5551234" not in line and "@example.com" not in line
    assert _logs_containing(quiet) == []  # serve.log_requests is off by default


def test_metrics_reach_the_prometheus_endpoint(server):
    for i in range(3):
        r = httpx.post(server["cont"] + "/v1/completions", json=body(max_tokens=6, seed=i), timeout=30)
        assert r.status_code == 200
    assert httpx.post(server["cont"] + "/v1/completions", json=body(max_tokens=0)).status_code == 400
    route = r'route="/v1/completions"'
    wait_for_metrics(rf'^ray_alignray_requests_total\{{(?=[^}}]*code="200")(?=[^}}]*{route})[^}}]*\}} [1-9]')
    wait_for_metrics(r'^ray_alignray_requests_total\{(?=[^}]*code="400")[^}]*\} [1-9]')
    wait_for_metrics(r'^ray_alignray_reward_probability_count\{[^}]*application="cont"[^}]*\} [1-9]')
    # a metric no other test sets: an earlier Ray session in this process (the training tests) may still have
    # its last 'entropy' in the process's metric registry
    publish_training_metrics(
        {"iteration": 3, "rm_score": 0.5, "kl_ref": 1.5, "kl_target": 2.0, "nan_only_in_this_test": float("nan")}
    )
    text = wait_for_metrics(r"^ray_alignray_train_kl_ref(\{[^}]*\})? 1\.5")
    assert not re.search(r"^ray_alignray_train_nan_only_in_this_test", text, re.M)  # NaN is not exported
    # every series the alert rules and the dashboard read is really there (training ones just published)
    manifest = (MANIFESTS / "prometheus-alerts.yaml").read_text() + (MANIFESTS / "grafana-dashboard.json").read_text()
    wanted = set(re.findall(r"\b(ray_(?:alignray_(?!train_)|serve_)[a-z0-9_]+)", manifest))
    assert len(wanted) >= 10
    text = wait_until(lambda: (t := metrics_text()) and all(re.search(rf"^{n}[{{ ]", t, re.M) for n in wanted) and t)
    for name in ("iteration", "rm_score", "kl_ref", "kl_target"):
        assert re.search(rf"^ray_alignray_train_{name}[{{ ]", text, re.M)
