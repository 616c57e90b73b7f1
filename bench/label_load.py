"""Load and fault test of the labelling app: simulated annotators over HTTP against `alignray label`.

Starts ``alignray label tiny --candidates FILE`` (its own Ray, the app on loopback, SQLite in a
temporary run directory) in a child process, invites the annotators, and lets them label for
``--seconds``, each in its own thread through the HTTP API (``serve.labelling.client``), as the
page does. With ``--kill-at S`` the whole server (the ``alignray`` process, Ray and the replica)
is killed with SIGKILL S seconds in and started again; the annotators keep retrying with the same
request ids. At the end the database is checked against what the clients were acknowledged:

- lost: acknowledged label ids missing from the database;
- duplicated: an (annotator, item) pair or a slot labelled twice, or a label stored twice for one request;
- partial: a label without all of its choice rows.

    python bench/label_load.py --annotators 20 --seconds 120
    python bench/label_load.py --annotators 20 --seconds 120 --kill-at 45
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from envs.data import write_candidates  # noqa: E402
from serve.labelling.client import LabelClient  # noqa: E402
from serve.labelling.schema import choices, submissions  # noqa: E402
from serve.labelling.simulated import SimulatedAnnotator  # noqa: E402
from serve.labelling.store import LabelStore  # noqa: E402

CRITERIA = ["quality", "safety", "consistency"]
WORDS = "great good fine dull bad awful wonderful boring lovely terrible".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run: Path, port: int, candidates: Path, log) -> subprocess.Popen:
    """`alignray label` in its own session; returns once it prints its URL."""
    cmd = [str(Path(sys.executable).parent / "alignray"), "label", "tiny", f"run.output_dir={run}"]
    cmd += [f"serve.port={port}", "feedback.sqlite_synchronous=FULL", "--candidates", str(candidates)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=run)
    deadline = time.time() + 180
    for line in proc.stdout:
        log.write(line)
        if re.search(r"labelling app at", line):
            threading.Thread(target=lambda: [log.write(x) for x in proc.stdout], daemon=True).start()
            return proc
        if time.time() > deadline:
            break
    proc.kill()
    raise SystemExit(f"alignray label did not start; see {log.name}")


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the server and everything it started (Ray's GCS, raylet, workers, the replica)."""
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _check(store: LabelStore, acked: list[int]) -> dict:
    with store.engine.connect() as c:
        stored = set(c.execute(select(submissions.c.id)).scalars())
        pairs = c.execute(
            select(submissions.c.annotator_id, submissions.c.item_id, func.count())
            .group_by(submissions.c.annotator_id, submissions.c.item_id)
            .having(func.count() > 1)
        ).all()
        per = dict(c.execute(select(choices.c.submission_id, func.count()).group_by(choices.c.submission_id)).all())
    return {
        "acknowledged": len(acked),
        "stored": len(stored),
        "lost": len(set(acked) - stored),
        "acknowledged_twice": len(acked) - len(set(acked)),
        "duplicated_pairs": len(pairs),
        "partial": sum(1 for i in stored if per.get(i) != 1 + len(CRITERIA)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--annotators", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--kill-at", type=float, default=0, help="SIGKILL the whole server this many seconds in")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    run = Path(tempfile.mkdtemp(prefix="alignray-label-load-"))
    rows = [
        {"prompt": f"Review {i}: the film was", "response_a": f"{WORDS[i % 10]} {i}", "response_b": f"{WORDS[i % 7]} x"}
        for i in range(args.items)
    ]
    write_candidates(run / "candidates.parquet", rows)
    port, log = _free_port(), open(run / "server.log", "w")
    started = time.time()
    proc = _start(run, port, run / "candidates.parquet", log)
    print(f"server up in {time.time() - started:.0f}s; store {run / 'labels.db'}", flush=True)
    store = LabelStore(f"sqlite:///{run / 'labels.db'}")
    url = f"http://127.0.0.1:{port}/label"
    sims = [
        SimulatedAnnotator(LabelClient(url, store.invite(f"load-{i}"), retry_s=300), CRITERIA, seed=i)
        for i in range(args.annotators)
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=s.run, kwargs={"stop": stop}, daemon=True) for s in sims]
    t0 = time.time()
    for t in threads:
        t.start()
    downtime = None
    if args.kill_at:
        time.sleep(args.kill_at)
        before = sum(len(s.acknowledged) for s in sims)
        _kill_all(proc)
        killed = time.time()
        print(f"killed the server at t={killed - t0:.0f}s after {before} acknowledged labels", flush=True)
        proc = _start(run, port, run / "candidates.parquet", log)
        while sum(len(s.acknowledged) for s in sims) == before:
            time.sleep(0.05)
        downtime = time.time() - killed
        print(f"labels flowing again {downtime:.1f}s after the kill", flush=True)
    time.sleep(max(0.0, args.seconds - (time.time() - t0)))
    stop.set()
    for t in threads:
        t.join(timeout=120)
    elapsed = time.time() - t0
    acked = [i for s in sims for i in s.acknowledged]
    lat = np.array([x for s in sims for x in s.latencies])
    result = {
        "annotators": args.annotators,
        "seconds": round(elapsed, 1),
        "labels_per_s": round(len(acked) / elapsed, 2),
        "label_latency_p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
        "label_latency_p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1),
        "label_latency_max_s": round(float(lat.max()), 2),
        "kill_at_s": args.kill_at or None,
        "downtime_s": None if downtime is None else round(downtime, 1),
        **_check(store, acked),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    store.close()
    _kill_all(proc) if proc.poll() is None else None  # the bench's own server: stop it (SIGINT is slower)


if __name__ == "__main__":
    main()
