"""Tiny-model training submitted with `alignray submit` to a real two-node Ray cluster on this machine.

The cluster (``cluster.local_cluster.LocalCluster``) has token authentication on, a private temp
dir, and two nodes: a head with 2 CPUs and a worker with 2 CPUs tagged ``rollout: 2``. It is
started once for this module and always stopped, leftovers included. Every test is marked
``cluster``: `make test-all` (or ``pytest -m cluster tests/cluster``) runs them.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import jobs
from cluster.run_log import read_metrics
from tests.fixtures.local_cluster import LocalCluster

pytestmark = pytest.mark.cluster
ROLLOUT = "rollout"
TINY = ["ppo.iterations=2"]


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as mp:
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
            mp.delenv(k, raising=False)
        with LocalCluster(head_cpus=2, workers=[{"num_cpus": 2, "resources": {ROLLOUT: 2}}]) as c:
            mp.setenv("RAY_AUTH_TOKEN", c.token)  # what a user exports; only the token, no other Ray state
            yield c
        assert c.leftover_pids() == []


@pytest.fixture
def client(cluster):
    return jobs.connect(cluster.dashboard_url)


def submit(cluster, out: Path, overrides: list[str], follow: bool = False, resume: bool = False) -> str:
    how = jobs.SubmitSettings(address=cluster.dashboard_url, follow=follow, resume=resume)
    return jobs.submit("tiny", [f"run.output_dir={out}", *overrides], how)


def wait_for(predicate, timeout: float, what: str, client=None, job_id: str | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if client is not None and str(client.get_job_status(job_id)) in jobs.TERMINAL:
            break
        time.sleep(0.25)
    logs = client.get_job_logs(job_id)[-4000:] if client is not None else ""
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def wait_done(client, job_id: str, timeout: float = 300) -> str:
    wait_for(lambda: str(client.get_job_status(job_id)) in jobs.TERMINAL, timeout, f"job {job_id} to end")
    return str(client.get_job_status(job_id))


def job_actors(cluster, client, job_id: str, class_name: str) -> list[dict]:
    ray_job = client.get_job_info(job_id).job_id  # the Ray job id (hex) its actors carry
    return [a for a in cluster.actors(class_name) if a.get("job_id") == ray_job]


def rollout_node_ids(cluster) -> list[str]:
    return [n["raylet"]["nodeId"] for n in cluster.alive_nodes() if ROLLOUT in n["raylet"].get("resourcesTotal", {})]


def iterations(out: Path) -> list[int]:
    path = out / "metrics.csv"
    return [int(r["iteration"]) for r in read_metrics(path)] if path.exists() else []


def learner_state(ckpt: Path) -> dict:
    return pickle.loads((ckpt / "learner_group" / "learner" / "state.pkl").read_bytes())


def adam_steps(ckpt: Path) -> dict[str, float]:
    """Steps taken by each of the learner's optimizers (the policy's and the value head's)."""
    return {
        name: max(float(s["step"]) for s in opt["state"]["state"].values())
        for name, opt in learner_state(ckpt)["optimizer"].items()
    }


# --- the tests ------------------------------------------------------------------------------
def test_submit_and_finish_with_token_auth(cluster, client, tmp_path, capsys, monkeypatch):
    job_id = submit(cluster, tmp_path / "run", TINY, follow=True)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == job_id and job_id.startswith("alignray-tiny-")
    assert f"alignray job: {Path(sys.executable).parent}" in out  # the cluster's own Python ran it
    assert str(client.get_job_status(job_id)) == "SUCCEEDED"
    assert iterations(tmp_path / "run") == [1, 2]
    assert (tmp_path / "run" / "policy" / "config.json").exists()
    jobs.jobs("status", job_id, cluster.dashboard_url)
    assert capsys.readouterr().out.startswith(f"{job_id}: SUCCEEDED")
    # token auth is really on: a wrong token and no token are both refused, with a clear message
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)
    with pytest.raises(SystemExit):
        jobs.jobs("status", job_id, cluster.dashboard_url)
    assert "rejected the token from $RAY_AUTH_TOKEN" in capsys.readouterr().err
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit):
        jobs.jobs("status", job_id, cluster.dashboard_url)
    assert "requires a token" in capsys.readouterr().err


def test_env_runners_land_on_the_tagged_node(cluster, client, tmp_path):
    rollout_node = rollout_node_ids(cluster)
    assert len(rollout_node) == 1
    job_id = submit(
        cluster,
        tmp_path / "run",
        TINY
        + [
            "rollout.num_env_runners=2",
            "rollout.num_cpus_per_env_runner=1",
            f"rollout.custom_resources_per_env_runner={{{ROLLOUT}: 1}}",
        ],
    )
    assert wait_done(client, job_id) == "SUCCEEDED", client.get_job_logs(job_id)[-4000:]
    runners = job_actors(cluster, client, job_id, "ResponseEnvRunner")
    assert len(runners) == 2
    assert {a["node_id"] for a in runners} == set(rollout_node)
    assert iterations(tmp_path / "run") == [1, 2]


def test_env_runner_killed_mid_training_the_run_completes(cluster, client, tmp_path):
    out, total = tmp_path / "run", 10  # Ray takes a few (short) iterations to bring the victim back
    job_id = submit(
        cluster,
        out,
        [
            f"ppo.iterations={total}",
            "ppo.episodes_per_iteration=32",
            "env.max_new_tokens=8",
            "rollout.num_env_runners=2",
            "rollout.num_cpus_per_env_runner=1",
            "rollout.num_envs_per_env_runner=4",
            f"rollout.custom_resources_per_env_runner={{{ROLLOUT}: 1}}",
            "rollout.restart_failed_env_runners=true",
            f"run.keep_checkpoints={total}",  # every checkpoint's data positions are read below
        ],
    )
    # After 2 iterations a stream that restarted at 0 would end the next iteration behind where it was.
    wait_for(lambda: len(iterations(out)) >= 2, 240, "two iterations", client, job_id)
    alive = [a for a in job_actors(cluster, client, job_id, "ResponseEnvRunner") if a["state"] == "ALIVE"]
    victim = alive[0]
    killed_during = len(iterations(out)) + 1
    os.kill(int(victim["pid"]), signal.SIGKILL)  # mid-run: iteration `killed_during` is sampling now
    assert wait_done(client, job_id) == "SUCCEEDED", client.get_job_logs(job_id)[-4000:]
    assert killed_during < total, "the kill came too late to test anything"
    assert iterations(out) == list(range(1, total + 1))
    assert all(r["episodes"] > 0 for r in read_metrics(out / "metrics.csv"))
    after = [a for a in job_actors(cluster, client, job_id, "ResponseEnvRunner") if a["actor_id"] == victim["actor_id"]]
    assert after and int(after[0]["num_restarts"]) >= 1, "the killed EnvRunner was restarted"
    # Every EnvRunner's prompt stream went on from where it was (the tiny preset checkpoints every
    # iteration); a checkpoint taken while the victim was down has None for it.
    saved = [
        json.loads((out / "checkpoints" / f"iter_{i:06d}" / "alignray_state.json").read_text())["data_positions"]
        for i in range(1, total + 1)
    ]
    for runner in (1, 2):
        seen = [pos[runner]["position"] for pos in saved if pos[runner] is not None]
        assert seen == sorted(seen) and saved[-1][runner] is not None, f"EnvRunner {runner}'s positions: {seen}"


def test_killed_job_resumes_with_kl_optimizer_and_data_position(cluster, client, tmp_path, capsys):
    out, total = tmp_path / "run", 6
    overrides = [
        f"ppo.iterations={total}",
        "run.checkpoint_every=1",
        f"run.keep_checkpoints={total}",  # the first checkpoint's Adam step count is read below
        "ppo.episodes_per_iteration=16",
        "rollout.num_env_runners=1",
        "rollout.num_cpus_per_env_runner=1",
    ]
    job_id = submit(cluster, out, overrides)
    ckpt_dir = out / "checkpoints"
    wait_for(lambda: (ckpt_dir / "iter_000002" / "alignray_state.json").exists(), 240, "checkpoint 2", client, job_id)
    driver = wait_for(lambda: client.get_job_info(job_id).driver_info, 30, "the driver's pid")
    os.killpg(os.getpgid(int(driver.pid)), signal.SIGKILL)  # the training job dies outright
    assert wait_done(client, job_id) == "FAILED"

    done = sorted(p for p in ckpt_dir.glob("iter_*") if (p / "alignray_state.json").exists())
    last, k = done[-1], int(done[-1].name.split("_")[1])
    assert k < total, "the kill came too late to test resume"
    before = [r for r in read_metrics(out / "metrics.csv") if r["iteration"] <= k]
    saved_coef = learner_state(last)["kl_controller"]["coef"]
    saved_steps, steps_per_iteration = adam_steps(last), adam_steps(ckpt_dir / "iter_000001")
    saved_pos = json.loads((last / "alignray_state.json").read_text())["data_positions"]

    capsys.readouterr()
    resumed = submit(cluster, out, overrides, follow=True, resume=True)
    assert str(client.get_job_status(resumed)) == "SUCCEEDED"
    rows = read_metrics(out / "metrics.csv")
    assert [r["iteration"] for r in rows] == list(range(1, total + 1))
    assert rows[:k] == before  # history up to the checkpoint is kept as it was
    assert rows[k]["kl_coef_used"] == pytest.approx(saved_coef)  # not the initial ppo.kl_coef
    assert saved_coef != pytest.approx(0.05)
    nxt = ckpt_dir / f"iter_{k + 1:06d}"
    assert len(saved_steps) == 2  # policy and value head
    assert adam_steps(nxt) == {n: saved_steps[n] + steps_per_iteration[n] for n in saved_steps}  # Adam went on counting
    pos = json.loads((nxt / "alignray_state.json").read_text())["data_positions"]
    runner = [i for i, p in enumerate(saved_pos) if p is not None]
    assert runner and all(pos[i]["position"] > saved_pos[i]["position"] for i in runner)
    assert all(pos[i]["seed"] == saved_pos[i]["seed"] for i in runner)


def test_two_learners_ddp_on_cpu(cluster, client, tmp_path):
    """Two remote Learners (torch DDP over gloo), pinned by a custom resource to the tagged node."""
    job_id = submit(
        cluster,
        tmp_path / "run",
        TINY + ["rollout.num_learners=2", f"rollout.custom_resources_per_learner={{{ROLLOUT}: 1}}"],
    )
    assert wait_done(client, job_id) == "SUCCEEDED", client.get_job_logs(job_id)[-4000:]
    mine = [a for a in cluster.actors() if a.get("job_id") == client.get_job_info(job_id).job_id]
    # RLlib runs remote Learners as Ray Train workers (torch.distributed, gloo on CPU)
    learners = [a for a in mine if a["class_name"].endswith("_WrappedExecutable")]
    assert len(learners) == 2, [a["class_name"] for a in mine]
    assert {a["node_id"] for a in learners} == set(rollout_node_ids(cluster))
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(r["policy_loss"] == r["policy_loss"] and r["learner_tokens_per_s"] > 0 for r in rows)


def test_cli_follow_exits_nonzero_when_the_job_fails(cluster, client, tmp_path):
    """Through the real console script: a job that fails on the cluster fails `alignray submit --follow`."""
    alignray = str(Path(sys.executable).with_name("alignray"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    res = subprocess.run(
        [
            alignray,
            "submit",
            "tiny",
            f"run.output_dir={tmp_path}/run",
            "data.prompts=no/such.parquet",
            "--follow",
            "--address",
            cluster.dashboard_url,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, res.stderr[-3000:]
    job_id = res.stdout.splitlines()[0]
    assert "no/such.parquet: no such file" in res.stdout  # the job's own error, streamed
    assert f"alignray: job {job_id} FAILED: Job entrypoint command failed with exit code 2" in res.stderr
    assert str(client.get_job_status(job_id)) == "FAILED"
