"""The `alignray` command line: one subcommand per job, each a thin call into the library.

Every command that takes a config accepts a preset name (``demo``, ``tiny``) or a YAML path,
followed by ``section.field=value`` overrides.
"""

from __future__ import annotations

import argparse
import sys

from cluster.config import Config, ConfigError, dump_config, field_docs, load_config, preset_and_overrides
from envs.data import DataError
from envs.models import ModelLoadError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="preset name under configs/ or a YAML file (default: demo)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")


def _load(args: argparse.Namespace) -> Config:
    """The config a command names: a preset (default demo) and its overrides, or overrides alone."""
    return load_config(*preset_and_overrides(args.config, args.overrides))


def cmd_config(args: argparse.Namespace) -> None:
    """Print the resolved config (or every field with its docstring)."""
    if args.docs:
        for name, default, doc in field_docs():
            print(f"{name} = {default!r}\n    {doc}")
        return
    print(dump_config(_load(args)), end="")


def cmd_train_rm(args: argparse.Namespace) -> None:
    """Train the reward model on the configured preference data."""
    from cluster.train import train_rm
    from envs.reward_training import metrics_lines

    metrics = train_rm(_load(args))
    print(f"reward model written to {metrics['path']} ({metrics['seconds']:.0f}s)")
    print("\n".join(metrics_lines(metrics)))


def cmd_train(args: argparse.Namespace) -> None:
    """Run PPO with RLlib."""
    from cluster.train import train

    train(_load(args), resume=args.resume)


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a checkpoint or HF directory against the reference on held-out prompts."""
    from cluster.evaluate import evaluate

    summary = evaluate(_load(args), args.model, out_dir=args.out)
    print(summary["text"])


def cmd_demo(args: argparse.Namespace) -> None:
    """Reward model, PPO, evaluation, report, export: the whole pipeline."""
    from cluster.demo import run_demo

    run_demo(_load(args), fresh=args.fresh)


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a policy (and the reward model) over OpenAI-compatible HTTP with Ray Serve."""
    from cluster.serving import run_serve

    run_serve(args.model, _load(args), reward_model=args.reward_model)


def cmd_submit(args: argparse.Namespace) -> None:
    """Submit `alignray train` as a Ray job."""
    from cluster.jobs import SubmitSettings, runtime_env_from_environ, submit

    how = SubmitSettings(
        address=args.address, follow=args.follow, resume=args.resume, runtime_env=runtime_env_from_environ()
    )
    submit(args.config, args.overrides, how)


def cmd_jobs(args: argparse.Namespace) -> None:
    """Status, logs or stop of a submitted Ray job."""
    from cluster.jobs import jobs

    jobs(args.action, args.job_id, address=args.address)


def cmd_label(args: argparse.Namespace) -> None:
    """The labelling app: serve it, or invite / export / stats on its store."""
    from cluster import labelling

    words = list(args.words)
    action = words.pop(0) if words and words[0] in LABEL_ACTIONS else "serve"
    needs = LABEL_ACTIONS.get(action)
    if needs and (not words or "=" in words[0]):
        raise ConfigError(f"alignray label {action} needs {needs}")
    target = words.pop(0) if needs else None
    cfg = load_config(*preset_and_overrides(words[0] if words else None, words[1:]))
    if action == "invite":
        print(labelling.invite(cfg, target, admin=args.admin))
    elif action == "export":
        print(f"alignray: {labelling.export_labels(cfg, target)} preference rows written to {target}")
    elif action == "stats":
        print(labelling.stats_text(cfg))
    else:
        labelling.run_label(cfg, args.policy, args.candidates, args.reward_model, args.round)


def cmd_iterate(args: argparse.Namespace) -> None:
    """Rounds of candidates -> labels -> reward model -> PPO -> evaluation."""
    from cluster.iterate import iterate

    result = iterate(_load(args), rounds=args.rounds, annotator=args.annotator, fresh=args.fresh)
    print(f"alignray: report in {result['report']}")


LABEL_ACTIONS = {"invite": "a NAME", "export": "an output .parquet path", "stats": None}
"""`alignray label` sub-actions -> the argument they need (none: serve the app)."""
MODEL = (("model",), {"help": "an HF model directory, a run directory, an RLlib checkpoint or 'smollm2'"})
COMMANDS = {
    "config": (
        "show a resolved config",
        cmd_config,
        [
            (("action",), {"choices": ["show"]}),
            "config",
            (("--docs",), {"action": "store_true", "help": "list every field with its docstring"}),
        ],
    ),
    "train-rm": ("train the reward model", cmd_train_rm, ["config"]),
    "train": (
        "run PPO",
        cmd_train,
        ["config", (("--resume",), {"action": "store_true", "help": "continue from the latest checkpoint"})],
    ),
    "eval": (
        "evaluate a policy against the reference",
        cmd_eval,
        [MODEL, "config", (("--out",), {"default": None, "help": "output directory (default: <model>/eval)"})],
    ),
    "demo": (
        "the end-to-end pipeline on the embedded default",
        cmd_demo,
        ["config", (("--fresh",), {"action": "store_true", "help": "retrain the reward model even if cached"})],
    ),
    "serve": (
        "serve a policy over HTTP",
        cmd_serve,
        [
            MODEL,
            "config",
            (("--reward-model",), {"default": None, "help": "also serve this reward model at /v1/rewards"}),
        ],
    ),
    "label": (
        "the labelling app: serve it, or `label invite NAME`, `label export OUT.parquet`, `label stats`",
        cmd_label,
        [
            (("words",), {"nargs": "*", "help": "[invite NAME | export OUT.parquet | stats] [preset] [k=v ...]"}),
            (("--policy",), {"default": None, "help": "model that writes the candidates (default: model.policy)"}),
            (("--candidates",), {"default": None, "help": "a Parquet file of candidate pairs instead of a policy"}),
            (("--reward-model",), {"default": None, "help": "show this reward model's scores on the admin page"}),
            (("--round",), {"type": int, "default": 0, "help": "round number recorded with new items"}),
            (("--admin",), {"action": "store_true", "help": "invite: an admin rather than an annotator"}),
        ],
    ),
    "iterate": (
        "rounds of RLHF with human or simulated feedback through the labelling app",
        cmd_iterate,
        [
            "config",
            (("--rounds",), {"type": int, "default": 2, "help": "number of rounds"}),
            (("--annotator",), {"choices": ["human", "simulated"], "default": "simulated"}),
            (("--fresh",), {"action": "store_true", "help": "start over (a new label store and rounds)"}),
        ],
    ),
    "submit": (
        "submit training as a Ray job",
        cmd_submit,
        [
            "config",
            (("--address",), {"default": None, "help": "Ray dashboard address (default: RAY_ADDRESS or local)"}),
            (("--follow",), {"action": "store_true", "help": "stream the job's logs until it ends"}),
            (("--resume",), {"action": "store_true", "help": "resume from the latest checkpoint"}),
        ],
    ),
    "jobs": (
        "inspect submitted jobs",
        cmd_jobs,
        [
            (("action",), {"choices": ["status", "logs", "stop"]}),
            (("job_id",), {}),
            (("--address",), {"default": None}),
        ],
    ),
}
"""Subcommand -> (help, function, arguments); "config" stands for the preset and its overrides."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="alignray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, func, arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        for arg in arguments:
            if arg == "config":
                _config_args(p)
            else:
                p.add_argument(*arg[0], **arg[1])
        p.set_defaults(func=func)
    return parser


def _quiet_transformers() -> None:
    """Keep our own progress bars readable: no per-load weight bars or load reports."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `alignray` console script."""
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        args.func(args)
    except ConfigError as err:
        print(f"alignray: config error: {err}", file=sys.stderr)
        return 2
    except (ModelLoadError, DataError) as err:
        print(f"alignray: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignray: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
