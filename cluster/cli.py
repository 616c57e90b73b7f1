"""The `alignray` command line: one subcommand per job, each a thin call into the library.

Every command that takes a config accepts a preset name (``demo``, ``tiny``) or a YAML path,
followed by ``section.field=value`` overrides.
"""

from __future__ import annotations

import argparse
import sys

from cluster.config import ConfigError, describe, dump_config, load_config
from envs.data import DataError
from policies.models import ModelLoadError


def _config_args(p: argparse.ArgumentParser, default: str | None = "demo") -> None:
    p.add_argument("config", nargs="?", default=default, help="preset name under configs/ or a YAML file")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides")


def _split_overrides(args: argparse.Namespace) -> tuple[str, list[str]]:
    """Allow overrides without a preset: `alignray train ppo.lr=1e-5` means the demo preset."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        overrides.insert(0, config)
        config = "demo"
    return config, overrides


def cmd_config(args: argparse.Namespace) -> None:
    """Print the resolved config (or every field with its docstring)."""
    if args.docs:
        for name, default, doc in describe():
            print(f"{name} = {default!r}\n    {doc}")
        return
    preset, overrides = _split_overrides(args)
    print(dump_config(load_config(preset, overrides)), end="")


def cmd_train_rm(args: argparse.Namespace) -> None:
    """Train the reward model on the configured preference data."""
    from envs.reward_training import train_reward_model

    preset, overrides = _split_overrides(args)
    metrics = train_reward_model(load_config(preset, overrides))
    print(f"reward model written to {metrics['path']}")
    line = f"held-out label accuracy {metrics['eval_accuracy']:.3f}"
    if "eval_spearman" in metrics:
        line += f", gold-order agreement {metrics['eval_gold_agreement']:.3f}, gold Spearman {metrics['eval_spearman']:.3f}"
    print(line + f" ({metrics['seconds']:.0f}s)")


def cmd_train(args: argparse.Namespace) -> None:
    """Run PPO with RLlib."""
    from policies.train import train

    preset, overrides = _split_overrides(args)
    train(load_config(preset, overrides), resume=args.resume)


def cmd_eval(args: argparse.Namespace) -> None:
    """Evaluate a checkpoint or HF directory against the reference on held-out prompts."""
    from policies.evaluate import evaluate

    cfg = load_config(args.config, args.overrides)
    summary = evaluate(cfg, args.model, out_dir=args.out)
    print(summary["text"])


def cmd_demo(args: argparse.Namespace) -> None:
    """Reward model, PPO, evaluation, report, export: the whole pipeline."""
    from policies.demo import run_demo

    preset, overrides = _split_overrides(args)
    run_demo(load_config(preset, overrides), fresh=args.fresh)


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a policy (and the reward model) over OpenAI-compatible HTTP with Ray Serve."""
    from serve.run import run_serve

    preset, overrides = _split_overrides(args)
    run_serve(args.model, load_config(preset, overrides), reward_model=args.reward_model)


def cmd_submit(args: argparse.Namespace) -> None:
    """Submit `alignray train` as a Ray job."""
    from cluster.jobs import submit

    submit(args.config, args.overrides, address=args.address, follow=args.follow, resume=args.resume)


def cmd_jobs(args: argparse.Namespace) -> None:
    """Status, logs or stop of a submitted Ray job."""
    from cluster.jobs import jobs

    jobs(args.action, args.job_id, address=args.address)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="alignray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="show a resolved config")
    p.add_argument("action", choices=["show"])
    _config_args(p)
    p.add_argument("--docs", action="store_true", help="list every field with its docstring")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train-rm", help="train the reward model")
    _config_args(p)
    p.set_defaults(func=cmd_train_rm)

    p = sub.add_parser("train", help="run PPO")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a policy against the reference")
    p.add_argument("model", help="an RLlib checkpoint, a run directory or an HF model directory")
    _config_args(p)
    p.add_argument("--out", default=None, help="output directory (default: <model>/eval)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the end-to-end pipeline on the embedded default")
    _config_args(p)
    p.add_argument("--fresh", action="store_true", help="retrain the reward model even if cached")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve a policy over HTTP")
    p.add_argument("model", help="an HF model directory, a run directory or 'smollm2'")
    _config_args(p)
    p.add_argument("--reward-model", default=None, help="also serve this reward model at /v1/rewards")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("submit", help="submit training as a Ray job")
    _config_args(p)
    p.add_argument("--address", default=None, help="Ray dashboard address (default: RAY_ADDRESS or local)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="inspect submitted jobs")
    p.add_argument("action", choices=["status", "logs", "stop"])
    p.add_argument("job_id")
    p.add_argument("--address", default=None)
    p.set_defaults(func=cmd_jobs)
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
