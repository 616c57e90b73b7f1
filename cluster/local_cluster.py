"""A throwaway multi-node Ray cluster on loopback, with token authentication on.

Tests and benchmarks use it to run `alignray submit` against a real cluster without touching
anyone else's Ray on the machine:

- every node is a ``ray start --block`` process with free ports, its dashboard on 127.0.0.1
  (Ray advertises the host's address even when given 127.0.0.1; see ``resolve_ip_for_localhost``);
- each worker node gets its own temp dir (nodes on one machine that share a session dir also share
  ``runtime_resources/``, and one node's runtime-env cleanup deletes another's job working dir);
- ``RAY_TMPDIR`` points at a private temp dir, so sessions, sockets and the
  ``ray_current_cluster`` file never collide with another local cluster;
- ``RAY_AUTH_MODE=token`` and a fresh ``RAY_AUTH_TOKEN`` are set on every node (the
  shared ``~/.ray/auth_token`` is neither read nor written);
- ``stop()`` never runs ``ray stop`` (which kills every Ray process on the machine): it
  SIGTERMs its own ``ray start`` processes, then SIGKILLs any leftover process whose
  environment carries this cluster's private ``RAY_TMPDIR`` (workers, job drivers).

    with LocalCluster(head_cpus=2, workers=[{"num_cpus": 2, "resources": {"rollout": 2}}]) as c:
        submit(..., address=c.dashboard_url)   # with c.env() applied to os.environ
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

RAY_BIN = Path(sys.executable).with_name("ray")


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (racy, but good enough for a test cluster)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """Head plus worker nodes started with ``ray start`` on 127.0.0.1; a context manager."""

    def __init__(
        self,
        head_cpus: float = 2,
        workers: list[dict[str, Any]] | None = None,
        head_resources: dict[str, float] | None = None,
        token: str | None = None,
        object_store_mb: int = 200,
    ):
        self.head_cpus = head_cpus
        self.workers = workers or []
        self.head_resources = head_resources or {}
        self.token = token or secrets.token_hex(32)
        self.object_store_bytes = object_store_mb * 1024 * 1024
        # Short path: Ray's Unix socket paths must stay under ~107 characters.
        self.tmp = tempfile.mkdtemp(prefix="arc-", dir="/tmp")
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.procs: list[subprocess.Popen] = []

    # -- addresses and environment ------------------------------------------------------
    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """Variables a client needs to talk to this cluster (and to nothing else)."""
        return {"RAY_TMPDIR": self.tmp, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def _node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        env.update(self.env())
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return env

    # -- lifecycle ------------------------------------------------------------------------
    def _ray_start(self, args: list[str], name: str) -> None:
        log = open(Path(self.tmp) / f"{name}.log", "wb")
        common = [
            "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
            f"--object-store-memory={self.object_store_bytes}",
            f"--dashboard-agent-listen-port={free_port()}", "--log-style=record",
        ]  # fmt: skip
        proc = subprocess.Popen(
            [str(RAY_BIN), "start", *args, *common],
            env=self._node_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.procs.append(proc)

    def start(self) -> "LocalCluster":
        """Start the head, wait for its dashboard, then add each worker node and wait for it."""
        head = [
            "--head", f"--port={self.gcs_port}", f"--num-cpus={self.head_cpus}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
            f"--temp-dir={self.tmp}", f"--resources={json.dumps(self.head_resources)}",
        ]  # fmt: skip
        self._ray_start(head, "head")
        try:
            self._wait(lambda: len(self.alive_nodes()) >= 1, "the head node")
            for i, w in enumerate(self.workers):
                # Own temp dir per node: nodes sharing one session dir share runtime_resources/,
                # and one node's runtime-env GC then deletes a working_dir another node's job runs in.
                args = [f"--address={self.gcs_address}", f"--num-cpus={w.get('num_cpus', 1)}", f"--temp-dir={self.tmp}/w{i}"]
                args.append(f"--resources={json.dumps(w.get('resources', {}))}")
                if w.get("num_gpus"):
                    args.append(f"--num-gpus={w['num_gpus']}")
                self._ray_start(args, f"worker{i}")
                self._wait(lambda n=i + 2: len(self.alive_nodes()) >= n, f"worker node {i}")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, ready, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray start exited with {p.returncode} while waiting for {what}: {self.logs()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}: {self.logs()}")

    def api(self, path: str) -> Any:
        """GET a dashboard endpoint (e.g. ``/api/v0/actors?detail=1``) with the token; parsed JSON."""
        req = urllib.request.Request(f"{self.dashboard_url}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)

    def alive_nodes(self) -> list[dict[str, Any]]:
        """Alive nodes as the dashboard reports them."""
        nodes = self.api("/nodes?view=summary")["data"]["summary"]
        return [n for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"]

    def actors(self, class_name: str | None = None) -> list[dict[str, Any]]:
        """Actors (alive and dead) from the state API, optionally of one class."""
        rows = self.api("/api/v0/actors?limit=10000&detail=1")["data"]["result"]["result"]
        return [a for a in rows if class_name is None or a.get("class_name") == class_name]

    def logs(self) -> str:
        """The tail of each ``ray start`` log, for error messages."""
        out = []
        for f in sorted(Path(self.tmp).glob("*.log")):
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def stop(self) -> None:
        """Stop every process of this cluster (and only those), then remove the temp dir."""
        for p in reversed(self.procs):  # workers first, head last
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        time.sleep(0.5)
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        """Live processes whose environment carries this cluster's private RAY_TMPDIR."""
        marker = f"RAY_TMPDIR={self.tmp}".encode() + b"\0"
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if marker in (d / "environ").read_bytes() + b"\0":
                    pids.append(int(d.name))
            except OSError:
                continue
        return pids

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
