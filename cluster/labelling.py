"""``alignray label``: serve the labelling app, invite annotators, export labels, print statistics.

- ``alignray label [preset] [--policy MODEL | --candidates FILE] [--reward-model DIR]`` starts Ray
  (or joins ``RAY_ADDRESS``) and serves the app at ``http://serve.host:serve.port/label/`` until
  Ctrl-C. Items come from the policy deployment (default ``model.policy``), generated in batches
  of ``feedback.batch_size`` as annotators need them, or from a candidate Parquet file loaded
  once (``--candidates``). The admin key is ``serve.api_key`` / ``$ALIGNRAY_API_KEY``, else a
  fresh random key printed in the admin link.
- ``alignray label invite NAME [--admin]`` prints a personal link (a new token; an old link of
  the same person stops working). ``alignray label export OUT.parquet`` writes the preference
  file ``alignray train-rm`` reads; ``alignray label stats`` prints labels per annotator and hour
  and agreement per criterion. These three work on the store directly, server running or not.

The store is ``feedback.db_url``, by default SQLite at ``<run.output_dir>/labels.db``.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

from cluster.config import Config
from cluster.serving import api_key, check_port
from envs.data import load_prompts, resolve_path
from policies.export import resolve_policy
from serve.labelling.application import delete_label_app, deploy_label_app
from serve.labelling.candidates import GenerationSpec, load_candidate_file
from serve.labelling.reports import export, format_stats, stats
from serve.labelling.store import LabelStore

APP_NAME = "label"
ROUTE = "/label"


def db_url(cfg: Config) -> str:
    """``feedback.db_url``, or SQLite in the run directory (created if needed)."""
    if cfg.feedback.db_url:
        return cfg.feedback.db_url
    out = resolve_path(cfg.run.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'labels.db'}"


def open_store(cfg: Config) -> LabelStore:
    """The configured label store (tables created on first use)."""
    f = cfg.feedback
    return LabelStore(db_url(cfg), f.overlap, f.claim_timeout_s, f.sqlite_synchronous)


def base_url(cfg: Config) -> str:
    """Where the app answers: http://host:port/label."""
    host = f"[{cfg.serve.host}]" if ":" in cfg.serve.host else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}{ROUTE}"


def invite(cfg: Config, name: str, admin: bool = False) -> str:
    """A personal link for `name` (the token travels in the fragment, never to a server log)."""
    store = open_store(cfg)
    try:
        token = store.invite(name, "admin" if admin else "annotator")
    finally:
        store.close()
    return f"{base_url(cfg)}/{'admin' if admin else ''}#t={token}"


def export_labels(cfg: Config, out: str | Path, rounds: list[int] | None = None) -> int:
    """Write the labels as a preference file; returns the number of rows."""
    store = open_store(cfg)
    try:
        return export(store, out, rounds)
    finally:
        store.close()


def stats_text(cfg: Config) -> str:
    store = open_store(cfg)
    try:
        return format_stats(stats(store))
    finally:
        store.close()


def generation_spec(cfg: Config, policy: str, round_: int = 0) -> tuple[GenerationSpec, str]:
    """(how to ask the policy for candidates, the policy's model spec) for `policy`."""
    spec, name = resolve_policy(policy)
    prompts = load_prompts(resolve_path(cfg.data.prompts), "train")
    if cfg.data.max_prompts:
        prompts = prompts[: cfg.data.max_prompts]
    gen = GenerationSpec(
        model_name=name,
        prompts=prompts,
        policy=spec,
        instruction=cfg.env.instruction,
        chat_template=cfg.env.chat_template,
        max_tokens=cfg.env.max_new_tokens,
        temperature=cfg.feedback.temperature,
        seed=cfg.run.seed * 1000 + round_,
    )
    return gen, spec


def start_label_app(
    cfg: Config,
    admin_key: str,
    policy: str | None = None,
    reward_model: str | None = None,
    round_: int = 0,
    max_items: int = 0,
) -> str:
    """Deploy the app on the connected Ray cluster (replacing a running one); return its URL."""
    from ray import serve

    spec, model = (None, None)
    if policy is not None:
        spec, path = generation_spec(cfg, policy, round_)
        model = cfg.model.model_copy(update={"policy": path})
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    deploy_label_app(
        APP_NAME,
        ROUTE,
        cfg.feedback,
        db_url(cfg),
        admin_key,
        cfg.serve,
        model,
        spec,
        reward_model,
        round_,
        max_items,
        cfg.run.torch_threads,
    )
    return base_url(cfg)


def admin_key_for(cfg: Config) -> str:
    """The configured API key, else a fresh one for this server's lifetime."""
    return api_key(cfg) or secrets.token_urlsafe(24)


def run_label(
    cfg: Config,
    policy: str | None = None,
    candidates: str | None = None,
    reward_model: str | None = None,
    round_: int = 0,
) -> None:
    """``alignray label``: serve until Ctrl-C / SIGTERM."""
    import ray
    from ray import serve

    if candidates:
        store = open_store(cfg)
        try:
            added = load_candidate_file(store, resolve_path(candidates), round_)
        finally:
            store.close()
        print(f"alignray: {added} new items from {candidates}", flush=True)
        policy = None
    else:
        policy = policy or cfg.model.policy
        resolve_policy(policy)  # a bad path fails before Ray starts
    own_cluster = not os.environ.get("RAY_ADDRESS")
    if own_cluster:
        check_port(cfg.serve.host, cfg.serve.port)
    ray.init(address="local" if own_cluster else None, include_dashboard=False)
    key = admin_key_for(cfg)
    try:
        url = start_label_app(cfg, key, policy, reward_model, round_)
        print(f"alignray: labelling app at {url}/ (store {db_url(cfg)})", flush=True)
        print(f"alignray: admin page {url}/admin#t={key}", flush=True)
        print("alignray: invite annotators with `alignray label invite NAME` (same config)", flush=True)
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
            delete_label_app(APP_NAME)
        ray.shutdown()
