"""Building and running the Serve application: ``alignray serve`` and ``serve deploy``.

- :func:`build_application` turns a model, a :class:`~cluster.config.Config` and an optional
  reward-model directory into a Ray Serve application (the policy deployment, plus the reward
  deployment bound to it as a handle).
- :func:`build_app` is the same for ``serve deploy serve/serve_config.yaml`` on a cluster: an
  application builder whose ``args`` are ``model``, ``config``, ``overrides``, ``reward_model``.
- :func:`run_serve` is ``alignray serve``: start (or join) Ray, bind the HTTP proxy to
  ``serve.host:serve.port`` (loopback by default), print the URL, block until Ctrl-C or SIGTERM,
  then take the application down.

The API key is ``serve.api_key`` or, when that is empty, the ``ALIGNRAY_API_KEY`` environment
variable of the process that builds the application.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from cluster.config import Config, ConfigError, ServeConfig, load_config
from policies.models import ModelLoadError

APP_NAME = "alignray"
BUILTIN_SPECS = ("smollm2", "tiny")


def resolve_policy(model: str) -> tuple[str, str]:
    """Map ``alignray serve``'s model argument to (spec for load_causal_lm, served model id).

    Accepts 'smollm2' / 'tiny', an HF model directory, or a run directory holding ``policy/``.
    """
    if model in BUILTIN_SPECS:
        return model, model
    path = Path(model).expanduser()
    if (path / "config.json").exists():
        name = path.resolve().parent.name if path.resolve().name == "policy" else path.resolve().name
        return str(path.resolve()), name
    if (path / "policy" / "config.json").exists():
        return str((path / "policy").resolve()), path.resolve().name
    if path.exists():
        raise ModelLoadError(f"model {model!r}: neither a Hugging Face model directory (config.json) "
                             "nor a run directory with an exported policy/ in it")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model {model!r}: no such directory")
    return model, model  # a hub id (needs a network)


def resolve_reward_model(path: str) -> tuple[str, str]:
    """Check a reward-model directory before starting anything -> (absolute path, served id)."""
    from envs.reward_model import HEAD_FILE, META_FILE

    p = Path(path).expanduser().resolve()
    if not (p / META_FILE).exists() or not (p / HEAD_FILE).exists():
        raise ModelLoadError(f"reward model {path!r}: not a trained reward model directory (no {META_FILE}); "
                             "run `alignray train-rm` first")
    return str(p), p.name


def deployment_options(s: ServeConfig) -> dict[str, Any]:
    """Replica count or autoscaling, resources and concurrency of the policy deployment."""
    if s.min_replicas > s.max_replicas:
        raise ConfigError(f"serve.min_replicas ({s.min_replicas}) must be <= serve.max_replicas ({s.max_replicas})")
    if s.max_ongoing_requests < s.max_batch_size:
        raise ConfigError(f"serve.max_ongoing_requests ({s.max_ongoing_requests}) must be >= "
                          f"serve.max_batch_size ({s.max_batch_size}), or batches can never fill")
    opts: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica},
    }
    if s.min_replicas == s.max_replicas:
        opts["num_replicas"] = s.min_replicas
    else:
        opts["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                      "target_ongoing_requests": s.target_ongoing_requests}
    return opts


def server_settings(cfg: Config, reward_name: str | None = None) -> dict[str, Any]:
    """The plain settings dict the policy deployment's constructor takes."""
    s = cfg.serve
    return {
        "api_key": s.api_key or os.environ.get("ALIGNRAY_API_KEY", ""),
        "max_tokens_limit": s.max_tokens_limit, "max_request_bytes": s.max_request_bytes,
        "max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s,
        "torch_threads": cfg.run.torch_threads, "dtype": cfg.model.dtype,
        "tiny_vocab_size": cfg.model.tiny_vocab_size, "reward_name": reward_name,
    }


def build_application(model: str, cfg: Config, reward_model: str | None = None):
    """The Serve application for a policy (and optionally a reward model) under a config."""
    from serve.app import PolicyServer
    from serve.rewards import RewardScorer

    spec, name = resolve_policy(model)
    name = cfg.serve.model_name or name
    reward, reward_name = None, None
    if reward_model:
        path, reward_name = resolve_reward_model(reward_model)
        reward = RewardScorer.options(
            ray_actor_options={"num_cpus": cfg.serve.num_cpus_per_replica, "num_gpus": 0},
        ).bind(path, batch_wait_timeout_s=cfg.serve.batch_wait_timeout_s, torch_threads=cfg.run.torch_threads)
    policy = PolicyServer.options(**deployment_options(cfg.serve))
    return policy.bind(spec, name, server_settings(cfg, reward_name), reward)


def build_app(args: dict[str, Any]):
    """Application builder for ``serve deploy``: args ``model``, ``config``, ``overrides``, ``reward_model``."""
    unknown = sorted(set(args) - {"model", "config", "overrides", "reward_model"})
    if unknown:
        raise ConfigError(f"unknown application arg {unknown[0]!r} (valid: model, config, overrides, reward_model)")
    cfg = load_config(args.get("config"), list(args.get("overrides") or []))
    return build_application(args.get("model") or cfg.model.policy, cfg, args.get("reward_model"))


def _check_port(host: str, port: int) -> None:
    """Fail early, naming the field, if the HTTP port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError(f"serve.port: cannot listen on {host}:{port} ({err.strerror}); "
                              "pick another with serve.port=PORT") from err


def start_app(model: str, cfg: Config, reward_model: str | None = None, name: str = APP_NAME,
              route_prefix: str = "/") -> str:
    """Deploy the application on the connected Ray cluster (Serve started on cfg.serve.host:port); return its URL."""
    from ray import serve

    application = build_application(model, cfg, reward_model)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(application, name=name, route_prefix=route_prefix)
    host = f"[{cfg.serve.host}]" if ":" in cfg.serve.host else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}{route_prefix.rstrip('/')}"


def run_serve(model: str, cfg: Config, reward_model: str | None = None) -> None:
    """``alignray serve``: serve until Ctrl-C / SIGTERM, then shut the application down cleanly."""
    import ray
    from ray import serve

    resolve_policy(model)  # fail on a bad path before starting Ray
    if reward_model:
        resolve_reward_model(reward_model)
    own_cluster = not os.environ.get("RAY_ADDRESS")
    if own_cluster:
        _check_port(cfg.serve.host, cfg.serve.port)
    # address="local": start our own Ray rather than join (and later shut down) whatever local
    # cluster happens to be running; RAY_ADDRESS opts into joining one.
    ray.init(address="local" if own_cluster else None)
    try:
        url = start_app(model, cfg, reward_model)
        key = "required (Authorization: Bearer ...)" if server_settings(cfg)["api_key"] else "off"
        print(f"alignray: serving {url}/v1 (OpenAI-compatible; API key {key}); health at {url}/healthz", flush=True)
        if reward_model:
            print(f"alignray: reward model at {url}/v1/rewards", flush=True)
        if cfg.serve.host not in ("127.0.0.1", "localhost", "::1") and key == "off":
            print("alignray: warning: listening beyond loopback without an API key", flush=True)
        print("alignray: press Ctrl-C to stop", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("alignray: shutting down", flush=True)
    finally:
        if own_cluster:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
