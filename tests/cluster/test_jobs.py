"""`alignray submit` without a cluster: address and token resolution, what gets submitted, the launcher script."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from cluster import jobs
from cluster.config import REPO_ROOT, load_config
from tests.fixtures.local_cluster import free_port


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for k in (
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAY_AUTH_MODE",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "ALIGNRAY_RUNTIME_ENV",
    ):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ray/auth_token unless a test writes one


def test_address_precedence(monkeypatch):
    assert jobs.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not a dashboard: ignored
    assert jobs.resolve_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.2:8265/")
    assert jobs.resolve_address(None) == "http://10.0.0.2:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.3:8265")
    assert jobs.resolve_address(None) == "http://10.0.0.3:8265"
    assert jobs.resolve_address("head:8265") == "http://head:8265"  # the flag wins over the environment
    assert jobs.is_local("http://127.0.0.1:8265") and jobs.is_local("http://localhost:1")
    assert not jobs.is_local("http://10.0.0.3:8265")


def test_token_sources_in_rays_order(monkeypatch, tmp_path):
    assert jobs.read_token()[0] is None
    default = tmp_path / "home" / ".ray" / "auth_token"
    default.parent.mkdir(parents=True)
    default.write_text("from-default\n")
    assert jobs.read_token() == ("from-default", str(default))
    path = tmp_path / "tok"
    path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert jobs.read_token()[0] == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.read_token()[0] == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.read_token()[0] is None


def test_unreadable_token_path_is_an_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SystemExit):
        jobs.read_token()
    assert "RAY_AUTH_TOKEN_PATH" in capsys.readouterr().err


def test_unreachable_address_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        jobs.jobs("status", "raysubmit_x", address=f"http://127.0.0.1:{free_port()}")
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "cannot reach a Ray dashboard at http://127.0.0.1:" in err and "--address" in err


def test_submit_rejects_a_bad_config_before_connecting(capsys):
    from cluster.config import ConfigError

    with pytest.raises(ConfigError, match="ppo.lr"):
        jobs.submit("tiny", ["ppo.lr=-1"], jobs.SubmitSettings(address=f"http://127.0.0.1:{free_port()}"))


def test_train_args_pin_run_paths_on_a_local_cluster():
    cfg = load_config("tiny", ["run.output_dir=runs/x"])
    args = jobs.train_args("tiny", ["run.output_dir=runs/x"], cfg, local=True)
    assert args[0] == "tiny"
    assert f"run.output_dir={REPO_ROOT / 'runs/x'}" in args
    assert f"reward_model.path={REPO_ROOT / cfg.reward_model.path}" in args
    assert load_config(args[0], args[1:]).run.output_dir == str(REPO_ROOT / "runs/x")  # the last override wins


def test_train_args_warn_about_relative_outputs_on_a_remote_cluster(capsys):
    cfg = load_config("tiny")
    args = jobs.train_args("tiny", [], cfg, local=False)
    assert args == ["tiny"]
    assert "run.output_dir=runs/tiny is relative" in capsys.readouterr().err


def test_yaml_inside_the_repo_is_passed_by_relative_path():
    path = REPO_ROOT / "configs" / "tiny.yaml"
    args = jobs.train_args(str(path), ["ppo.iterations=3"], load_config(path, ["ppo.iterations=3"]), local=False)
    assert args[:2] == ["configs/tiny.yaml", "ppo.iterations=3"]


def test_yaml_outside_the_repo_is_inlined_as_overrides(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text(
        "env:\n  instruction: 'Say: yes'\n  reward: {gold: 1.0}\nppo:\n  lr: 1.0e-5\nmodel:\n  policy: tiny\n"
    )
    cfg = load_config(own, ["run.seed=7"])
    args = jobs.train_args(str(own), ["run.seed=7"], cfg, local=False)
    assert args[0] == "demo"
    assert load_config(args[0], args[1:]) == cfg  # exact round trip, through the shell too
    words = shlex.split(jobs.entrypoint(args, resume=False))
    assert load_config(words[3], words[4:]) == cfg


def test_entrypoint_and_resources():
    cmd = jobs.entrypoint(["tiny", "rollout.custom_resources_per_env_runner={rollout: 1}"], resume=True)
    assert shlex.split(cmd) == [
        "sh",
        "cluster/job_entrypoint.sh",
        "train",
        "tiny",
        "rollout.custom_resources_per_env_runner={rollout: 1}",
        "--resume",
    ]
    assert jobs.entrypoint_resources(load_config("tiny")) == {}
    gpu_driver = load_config("tiny", ["rollout.num_learners=0", "rollout.num_gpus_per_learner=1"])
    assert jobs.entrypoint_resources(gpu_driver) == {"entrypoint_num_gpus": 1.0}
    assert (
        jobs.entrypoint_resources(load_config("tiny", ["rollout.num_learners=2", "rollout.num_gpus_per_learner=1"]))
        == {}
    )


def test_runtime_env_default_and_extra(monkeypatch, tmp_path):
    env = jobs.runtime_env(jobs.runtime_env_from_environ())
    assert env["working_dir"] == str(REPO_ROOT)
    assert {".venv*", "runs", ".git"} <= set(env["excludes"])
    monkeypatch.setenv("ALIGNRAY_RUNTIME_ENV", "{pip: [rich], env_vars: {A: '1'}, excludes: [big/]}")
    env = jobs.runtime_env(jobs.runtime_env_from_environ())
    assert env["pip"] == ["rich"] and env["env_vars"] == {"A": "1"} and "big/" in env["excludes"]
    f = tmp_path / "re.yaml"
    f.write_text("env_vars: {B: '2'}\n")
    monkeypatch.setenv("ALIGNRAY_RUNTIME_ENV", str(f))
    assert jobs.runtime_env(jobs.runtime_env_from_environ())["env_vars"] == {"B": "2"}
    monkeypatch.setenv("ALIGNRAY_RUNTIME_ENV", "[not, a, mapping]")
    with pytest.raises(SystemExit):
        jobs.runtime_env(jobs.runtime_env_from_environ())


def _run_launcher(parent_args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the launcher script as a child of a Python process whose command line is `parent_args`."""
    code = "import subprocess,sys; sys.exit(subprocess.run(['sh','cluster/job_entrypoint.sh','config','show','tiny']).returncode)"
    return subprocess.run(
        [sys.executable, "-c", code, *parent_args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_launcher_script_uses_the_raylets_worker_python(tmp_path):
    """Like a raylet ancestor: `--python_worker_command=<python> ...` picks this venv's Python even
    when the PATH holds only a Python without alignray's dependencies."""
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python3").write_text("#!/bin/sh\necho wrong python >&2; exit 3\n")
    (bare / "python3").chmod(0o755)
    env = {"PATH": f"{bare}:/usr/bin:/bin", "HOME": str(tmp_path)}
    res = _run_launcher([f"--python_worker_command={sys.executable} setup_worker.py"], env)
    assert res.returncode == 0, res.stderr
    assert f"alignray job: {sys.executable} -m cluster.cli config show tiny" in res.stderr
    assert "policy: tiny" in res.stdout
    res = _run_launcher([], env)  # no raylet above: falls back to PATH, here the wrong one
    assert res.returncode == 3 and "wrong python" in res.stderr
    res = _run_launcher([], {**env, "ALIGNRAY_PYTHON": sys.executable})
    assert res.returncode == 0, res.stderr


def test_status_messages_drop_the_log_tail():
    msg = "Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\nboom"
    assert jobs.short(msg) == "Job entrypoint command failed with exit code 2"
    assert jobs.short("Job finished successfully.") == "Job finished successfully." and jobs.short(None) == ""
