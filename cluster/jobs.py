"""Ray Jobs: `alignray submit` runs `alignray train` on a Ray cluster; `alignray jobs` inspects it.

A job is Ray's unit of submitted work: an entrypoint shell command that Ray's job manager runs
on the head node (inside a ``JobSupervisor`` actor), plus a ``runtime_env`` shipped with it.

* **What is shipped.** ``runtime_env.working_dir`` is this repository (code, ``configs/`` and
  the shipped ``data/``), minus :data:`EXCLUDES` (virtualenvs, ``runs/``, git, caches). Extra
  runtime_env keys (``pip``, ``env_vars``, ``conda``, ``image_uri``...) come from
  ``$ALIGNRAY_RUNTIME_ENV``: a YAML file or an inline YAML mapping merged over the default.
* **Which Python runs it.** Ray runs the entrypoint with ``/bin/sh -c`` in the supervisor's
  environment, so a bare ``python`` is whatever is first on the PATH of the shell that ran
  ``ray start`` - often not the interpreter that has Ray. The entrypoint is therefore
  ``sh cluster/job_entrypoint.sh train ...``, which runs ``python -m cluster.cli`` with the
  interpreter Ray itself starts workers with on that node (see that script).
* **Token authentication.** Ray 2.60 clusters started by ``ray.init()`` (and any cluster with
  ``RAY_AUTH_MODE=token``) require ``Authorization: Bearer <token>`` on the dashboard's HTTP
  API. Ray's ``JobSubmissionClient`` only attaches the token when *this* process has
  ``RAY_AUTH_MODE=token``; we read the token the way Ray does (``RAY_AUTH_TOKEN``, then the
  file named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``) and always send it,
  unless ``RAY_AUTH_MODE=disabled``. The token is never printed.
* **Where outputs go.** A job's working dir is a temporary copy. On a cluster on this machine,
  relative ``run.output_dir`` and ``reward_model.path`` are pinned to this checkout's absolute
  paths so checkpoints land where you look and ``--resume`` finds them; on a remote cluster
  set ``run.output_dir`` to shared storage (a warning says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from pydantic import Field

from cluster.config import REPO_ROOT, Config, ConfigError, config_to_dict, load_config, preset_and_overrides
from envs.settings import Settings

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


class SubmitSettings(Settings):
    """How `alignray submit` reaches the cluster and what it does after submitting."""

    address: str | None = None
    """Ray dashboard address (None: $RAY_API_SERVER_ADDRESS, an http $RAY_ADDRESS, else the local dashboard)."""
    follow: bool = False
    """Stream the job's logs until it ends; exit non-zero if it failed."""
    resume: bool = False
    """Continue from the newest checkpoint under run.output_dir."""
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    """Extra runtime_env keys merged over the default (pip, env_vars, conda, image_uri, excludes...)."""


EXCLUDES = [
    ".venv*", "venv*", ".git", "runs", "build", "**/__pycache__", "*.egg-info",
    ".pytest_cache", "*.tmp*", "*.ckpt", "*.safetensors", "*.gguf",
]  # fmt: skip
"""Never uploaded: environments, run outputs, caches and loose weight files."""
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
# Fields whose relative paths point into runs/ (not uploaded) and must survive the job.
RUN_PATH_FIELDS = ("run.output_dir", "reward_model.path")
# Ray's client logs every upload step at INFO and warns that .git/.venv are excluded (we exclude them anyway).
QUIET_LOGGERS = {
    "ray.dashboard.modules.dashboard_sdk": logging.WARNING,
    "ray.dashboard.modules.job.sdk": logging.WARNING,
    "ray._private.runtime_env.packaging": logging.WARNING,
    "ray._private.runtime_env.working_dir": logging.ERROR,
}


def fail(message: str, code: int = 1) -> SystemExit:
    """A SystemExit that prints `alignray: <message>` to stderr."""
    print(f"alignray: {message}", file=sys.stderr)
    return SystemExit(code)


# --- address and token ----------------------------------------------------------------------
def resolve_address(address: str | None) -> str:
    """`--address`, else $RAY_API_SERVER_ADDRESS, else an http $RAY_ADDRESS, else local 8265."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address and "://" in os.environ.get("RAY_ADDRESS", ""):
        address = os.environ["RAY_ADDRESS"]
    address = (address or DEFAULT_ADDRESS).rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    return address


def is_local(address: str) -> bool:
    """True when the dashboard address is on this machine (so paths here are paths there)."""
    return (urlparse(address).hostname or "") in LOCAL_HOSTS


def read_token() -> tuple[str | None, str]:
    """(token, where it came from), in Ray's order; (None, reason) when there is none."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "$RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise fail(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {err.strerror}") from err
        if not token:
            raise fail(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        return token, f"$RAY_AUTH_TOKEN_PATH ({path})"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, "no token found"


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    """Ray's client lets $RAY_ADDRESS override an explicit address; hide it while we connect."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None):
    """A JobSubmissionClient for `address` with the token attached; clear errors otherwise."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    url = resolve_address(address)
    token, source = read_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with _without_address_env():
            return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as err:
        what = (
            f"rejected the token from {source}"
            if token
            else "requires a token and none was found ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"
        )
        raise fail(
            f"the Ray cluster at {url} {what}. Set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the "
            "cluster's token: `ray get-auth-token` on the head node prints it."
        ) from err
    except (ConnectionError, OSError) as err:
        raise fail(
            f"cannot reach a Ray dashboard at {url} ({err.__class__.__name__}). Start a cluster "
            "(`ray start --head`), or pass --address http://<head>:8265 or set RAY_ADDRESS."
        ) from err
    except RuntimeError as err:  # an HTTP server that is not a Ray dashboard, or a version clash
        raise fail(f"{url} did not answer as a Ray dashboard: {err}") from err


# --- what is submitted ----------------------------------------------------------------------
def runtime_env_from_environ() -> dict[str, Any]:
    """The extra runtime_env keys in $ALIGNRAY_RUNTIME_ENV (a YAML mapping, or a file holding one)."""
    extra = os.environ.get("ALIGNRAY_RUNTIME_ENV", "").strip()
    if not extra:
        return {}
    text = Path(extra).read_text() if Path(extra).is_file() else extra
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise fail(f"ALIGNRAY_RUNTIME_ENV is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise fail("ALIGNRAY_RUNTIME_ENV must be a YAML mapping (a runtime_env) or a file holding one")
    return data


def runtime_env(extra: dict[str, Any]) -> dict[str, Any]:
    """The job's runtime_env: this repo as working_dir, merged with the extra keys."""
    if not (REPO_ROOT / "pyproject.toml").is_file():  # an installed wheel: REPO_ROOT is site-packages
        raise fail(f"alignray submit uploads a source checkout as the job's working dir; {REPO_ROOT} is not one")
    data = dict(extra)
    env: dict[str, Any] = {"working_dir": str(REPO_ROOT), "excludes": list(EXCLUDES) + data.pop("excludes", [])}
    env["env_vars"] = data.pop("env_vars", {})
    env.update(data)
    return env


def flatten(cfg: Config) -> list[str]:
    """Every leaf of `cfg` as a `section.field=value` override (values as YAML flow scalars)."""
    out = []
    for section, fields in config_to_dict(cfg).items():
        for name, value in fields.items():
            text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
            out.append(f"{section}.{name}={text.removesuffix('...').strip()}")
    return out


def train_args(preset: str, overrides: list[str], cfg: Config, local: bool) -> list[str]:
    """The `alignray train` arguments that reproduce `cfg` inside the job's working dir."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.exists():
        try:  # a YAML inside the repo is uploaded with it; one outside is inlined as overrides
            preset, overrides = str(path.resolve().relative_to(REPO_ROOT)), list(overrides)
        except ValueError:
            preset, overrides = "demo", flatten(cfg)
    else:
        overrides = list(overrides)
    for name in RUN_PATH_FIELDS:
        section, field = name.split(".")
        value = getattr(getattr(cfg, section), field)
        if Path(value).is_absolute():
            continue
        if local:
            overrides.append(f"{name}={REPO_ROOT / value}")
        elif name == "run.output_dir":
            print(
                f"alignray: warning: {name}={value} is relative, so on the cluster it lands in the "
                "job's temporary working dir; set it to shared storage to keep checkpoints and --resume.",
                file=sys.stderr,
            )
    return [preset, *overrides]


def entrypoint(args: list[str], resume: bool) -> str:
    """The shell command Ray runs: the launcher script picks the cluster's Python."""
    words = ["sh", "cluster/job_entrypoint.sh", "train", *args] + (["--resume"] if resume else [])
    return " ".join(shlex.quote(w) for w in words)


def entrypoint_resources(cfg: Config) -> dict[str, float]:
    """With num_learners=0 the Learner lives in the driver, so the driver needs its GPUs."""
    r = cfg.rollout
    if r.num_learners == 0 and r.num_gpus_per_learner > 0:
        return {"entrypoint_num_gpus": r.num_gpus_per_learner}
    return {}


def submission_id(preset: str) -> str:
    """A readable, unique job id: alignray-<preset>-<UTC time>-<random>."""
    stem = Path(preset).stem.replace("_", "-")[:24] or "run"
    return f"alignray-{stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


# --- commands -------------------------------------------------------------------------------
def submit(config: str | None, overrides: list[str], how: SubmitSettings) -> str:
    """Validate the config here, submit `alignray train` as a Ray job, print its id."""
    preset, overrides = preset_and_overrides(config, overrides)
    cfg = load_config(preset, overrides)  # bad values fail here, before anything is uploaded
    client = connect(how.address)
    url = resolve_address(how.address)
    args = train_args(preset, overrides, cfg, local=is_local(url))
    job_id = client.submit_job(
        entrypoint=entrypoint(args, how.resume),
        submission_id=submission_id(preset),
        runtime_env=runtime_env(how.runtime_env),
        metadata={"alignray_preset": str(preset), "alignray_resume": str(how.resume)},
        **entrypoint_resources(cfg),
    )
    print(job_id)
    hint = f" --address {url}" if how.address else ""
    if not how.follow:
        print(
            f"follow with: alignray jobs logs {job_id}{hint}   (status: alignray jobs status {job_id}{hint})",
            file=sys.stderr,
        )
        return job_id
    status = follow_logs(client, job_id)
    if status != "SUCCEEDED":
        raise fail(f"job {job_id} {status}: {short(client.get_job_info(job_id).message)}".rstrip(": "))
    return job_id


def short(message: str | None) -> str:
    """A job's status message without the log tail Ray appends to failures."""
    return (message or "").split(", last available logs", 1)[0].splitlines()[0] if message else ""


def follow_logs(client, job_id: str) -> str:
    """Stream the job's logs to stdout until it ends; return its final status."""

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        print(f"\nalignray: stopped following; the job keeps running (alignray jobs stop {job_id})", file=sys.stderr)
        raise
    status = str(client.get_job_status(job_id))
    while status not in TERMINAL:  # the log stream can close a moment before the status flips
        time.sleep(0.5)
        status = str(client.get_job_status(job_id))
    return status


def jobs(action: str, job_id: str, address: str | None) -> None:
    """`status` prints the state (and why it failed), `logs` the output so far, `stop` stops it."""
    client = connect(address)
    try:
        if action == "status":
            info = client.get_job_info(job_id)
            line = f"{job_id}: {info.status}"
            print(line + (f" ({short(info.message)})" if info.message else ""))
        elif action == "logs":
            print(client.get_job_logs(job_id), end="")
        elif action == "stop":
            stopped = client.stop_job(job_id)
            print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
        else:
            raise ConfigError(f"unknown jobs action {action!r} (status, logs, stop)")
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise fail(f"no job {job_id!r} on {resolve_address(address)}") from err
        raise fail(str(err)) from err
