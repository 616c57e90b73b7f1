"""``alignray serve`` and ``serve deploy``: the Serve application built from the config.

- :func:`start_app` deploys the application (:func:`serve.application.build_application`) on the
  connected Ray cluster with the HTTP proxy on ``serve.host:serve.port`` (loopback by default).
- :func:`build_app` is the application builder for ``serve deploy serve/serve_config.yaml`` on a
  cluster; its ``args`` are ``model``, ``config``, ``overrides``, ``reward_model``.
- :func:`run_serve` is ``alignray serve``: start its own Ray (or join ``RAY_ADDRESS``), serve,
  print the URL, block until Ctrl-C or SIGTERM, then take the application down.

The API key is ``serve.api_key`` or, when that is empty, the ``ALIGNRAY_API_KEY`` environment
variable of the process that builds the application; ``serve.api_keys_file`` adds a file of keys
that is re-read when it changes (rotation without a restart). Metrics are on Ray's per-node
Prometheus endpoint (see ``serve.metrics``).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from cluster.config import Config, ConfigError, load_config
from envs.reward_model import RewardModel
from policies.export import resolve_policy
from serve.application import build_application

APP_NAME = "alignray"


def api_key(cfg: Config) -> str:
    """The key clients must send: ``serve.api_key``, else ``$ALIGNRAY_API_KEY`` (empty = open)."""
    return cfg.serve.api_key or os.environ.get("ALIGNRAY_API_KEY", "")


def application(model: str, cfg: Config, reward_model: str | None = None):
    """The Serve application for a policy (anything :func:`resolve_policy` takes) under a config."""
    spec, name = resolve_policy(model)
    keys = cfg.serve.api_keys_file
    if keys and not Path(keys).is_file():
        raise ConfigError(f"serve.api_keys_file: {keys} is not a file (one accepted key per line)")
    settings = cfg.model.model_copy(update={"policy": spec})
    return build_application(
        settings, cfg.serve.model_name or name, cfg.serve, api_key(cfg), reward_model, cfg.run.torch_threads
    )


def build_app(args: dict[str, Any]):
    """Application builder for ``serve deploy``: args ``model``, ``config``, ``overrides``, ``reward_model``."""
    unknown = sorted(set(args) - {"model", "config", "overrides", "reward_model"})
    if unknown:
        raise ConfigError(f"unknown application arg {unknown[0]!r} (valid: model, config, overrides, reward_model)")
    cfg = load_config(args.get("config"), list(args.get("overrides") or []))
    return application(args.get("model") or cfg.model.policy, cfg, args.get("reward_model"))


def check_port(host: str, port: int) -> None:
    """Fail early, naming the field, if something listens on the port.

    SO_REUSEADDR as the HTTP proxy itself binds: a server restarted after a crash must not be
    refused because of its old connections in TIME_WAIT.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError(
                f"serve.port: cannot listen on {host}:{port} ({err.strerror}); pick another with serve.port=PORT"
            ) from err


def start_app(
    model: str, cfg: Config, reward_model: str | None = None, name: str = APP_NAME, route_prefix: str = "/"
) -> str:
    """Deploy the application on the connected Ray cluster (Serve started on serve.host:serve.port); return its URL."""
    from ray import serve

    app = application(model, cfg, reward_model)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=name, route_prefix=route_prefix)
    host = f"[{cfg.serve.host}]" if ":" in cfg.serve.host else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}{route_prefix.rstrip('/')}"


def run_serve(model: str, cfg: Config, reward_model: str | None = None) -> None:
    """``alignray serve``: serve until Ctrl-C / SIGTERM, then shut the application down cleanly."""
    import ray
    from ray import serve

    resolve_policy(model)  # fail on a bad path before starting Ray
    if reward_model:
        RewardModel.check_dir(reward_model)
    own_cluster = not os.environ.get("RAY_ADDRESS")
    if own_cluster:
        check_port(cfg.serve.host, cfg.serve.port)
    # address="local": start our own Ray rather than join (and later shut down) whatever local
    # cluster happens to be running; RAY_ADDRESS opts into joining one.
    ray.init(address="local" if own_cluster else None)
    try:
        url = start_app(model, cfg, reward_model)
        key = "required (Authorization: Bearer ...)" if api_key(cfg) else "off"
        print(f"alignray: serving {url}/v1 (OpenAI-compatible; API key {key}); health at {url}/healthz", flush=True)
        if reward_model:
            print(f"alignray: reward model at {url}/v1/rewards", flush=True)
        metrics_port = ray.nodes()[0].get("MetricsExportPort")
        if metrics_port:
            print(f"alignray: Prometheus metrics at http://127.0.0.1:{metrics_port}/metrics", flush=True)
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
