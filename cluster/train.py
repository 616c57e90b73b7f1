"""``alignray train``: PPO on the text-generation env with RLlib, metrics, checkpoints, resume, export.

With ``rollout.reward_model_placement='actor'`` the driver starts the shared reward-model actor
(:mod:`envs.reward_actor`) before it builds the algorithm and kills it when training ends.

Layout of ``run.output_dir``::

    config.yaml           the resolved config of the run
    metrics.csv           one row per iteration (see cluster.run_log.METRICS)
    tb/                   TensorBoard scalars
    checkpoints/iter_N/   RLlib checkpoints (policy, value head, optimizer, KL coefficient, iteration)
                          + alignray_state.json (prompt-stream positions of every EnvRunner)
    policy/               the final policy as a Hugging Face directory (AutoModelForCausalLM; LoRA merged in)
    policy-adapter/       with LoRA, the adapter alone (peft; serve/eval take it too)
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import ray
import torch
from tqdm.auto import tqdm

from cluster.config import Config, dump_config
from cluster.run_log import RunLog, read_metrics, summarize
from cluster.telemetry import publish_training_metrics
from envs.data import resolve_path
from envs.models import export_pretrained
from envs.reward_actor import start_reward_actor, stop_reward_actor
from envs.reward_training import train_reward_model
from envs.rewards import uses_reward_model
from policies.algo import build_ppo_config
from policies.callbacks import DataPositions, data_positions, set_data_positions
from policies.export import policy_from_state
from policies.lm_module import ModuleSettings

STATE_FILE = "alignray_state.json"


def checkpoint_dir(out: Path, iteration: int) -> Path:
    """Where the checkpoint of `iteration` goes."""
    return out / "checkpoints" / f"iter_{iteration:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under `out`, if any."""
    done = [p for p in (out / "checkpoints").glob("iter_*") if (p / STATE_FILE).exists()]
    return max(done, key=lambda p: int(p.name.split("_")[1])) if done else None


def _data_positions(algo) -> list[dict | None]:
    """Prompt-stream position of every EnvRunner's vector env by worker index (None where a runner has no env)."""
    found = data_positions(algo.env_runner_group)
    return [found.get(idx) for idx in range(algo.env_runner_group.num_remote_env_runners() + 1)]


def _restore_data_positions(algo, positions: list[dict | None]) -> None:
    """Give every EnvRunner back its prompt-stream position (same order as saved)."""
    runners = algo.env_runner_group.num_remote_env_runners() + 1
    if len(positions) != runners:
        print(f"alignray: {len(positions)} saved prompt positions for {runners} EnvRunners; restarting the streams")
        return
    saved = {idx: pos for idx, pos in enumerate(positions) if pos is not None}
    set_data_positions(algo.env_runner_group, saved)
    for callback in algo.callbacks:  # an EnvRunner lost before the first new iteration gets them back too
        if isinstance(callback, DataPositions):
            callback.positions.update(saved)


def save_checkpoint(algo, out: Path, iteration: int, keep: int) -> Path:
    """Write an RLlib checkpoint plus our own state (the state file marks it complete); keep the newest `keep`."""
    path = checkpoint_dir(out, iteration)
    if path.exists():
        shutil.rmtree(path)
    algo.save_to_path(str(path.resolve()))
    (path / STATE_FILE).write_text(json.dumps({"iteration": iteration, "data_positions": _data_positions(algo)}))
    done = sorted((p for p in (out / "checkpoints").glob("iter_*") if (p / STATE_FILE).exists()), key=lambda p: p.name)
    for old in done[:-keep]:  # a SmolLM2 checkpoint with its Adam state is 1.7 GB
        shutil.rmtree(old, ignore_errors=True)
    return path


def policy_model(algo, adapter_dir: Path | None = None):
    """The learner's current policy as a plain HF model (and its tokenizer); with LoRA the adapter also goes to `adapter_dir`."""
    from ray.rllib.core import COMPONENT_LEARNER, COMPONENT_RL_MODULE, DEFAULT_MODULE_ID

    key = f"{COMPONENT_LEARNER}/{COMPONENT_RL_MODULE}/{DEFAULT_MODULE_ID}"
    state = algo.learner_group.get_state(components=key)[COMPONENT_LEARNER][COMPONENT_RL_MODULE][DEFAULT_MODULE_ID]
    settings = ModuleSettings.model_validate(algo.config.rl_module_spec.model_config["settings"])
    return policy_from_state(state, settings, adapter_dir)


def _ensure_ray(cfg: Config) -> bool:
    """Start (or join, with RAY_ADDRESS) Ray if needed; True when we started it."""
    if ray.is_initialized():
        return False
    ray.init(include_dashboard=False, log_to_driver=cfg.rollout.num_env_runners > 0)
    return True


def _start_reward_actor(cfg: Config):
    """The shared reward-model actor when ``rollout.reward_model_placement='actor'`` (else None).

    The driver owns it (not an EnvRunner), so it outlives EnvRunners that crash and are restarted.
    """
    r = cfg.rollout
    if r.reward_model_placement != "actor" or not uses_reward_model([*cfg.env.reward, *cfg.ppo.constraints]):
        return None
    return start_reward_actor(
        cfg.reward_model.resolved(),
        num_gpus=r.reward_model_num_gpus,
        resources=r.reward_model_resources,
        torch_threads=cfg.run.torch_threads,
    )


def train_rm(cfg: Config) -> dict:
    """``alignray train-rm``: the reward model on the configured preferences, with the run's seed and threads."""
    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    return train_reward_model(cfg.reward_model, resolve_path(cfg.data.preferences), cfg.run.seed)


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Run PPO for ``cfg.ppo.iterations`` iterations (continuing from the latest checkpoint if `resume`)."""
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    with contextlib.ExitStack() as cleanup:  # runs last-in first-out: algo, reward actor, Ray
        if _ensure_ray(cfg):
            cleanup.callback(ray.shutdown)
        rm_actor = _start_reward_actor(cfg)
        if rm_actor is not None:
            cleanup.callback(stop_reward_actor, rm_actor)
        algo = build_ppo_config(cfg, cfg.run.seed).build_algo()
        cleanup.callback(algo.stop)
        start = 0
        ckpt = latest_checkpoint(out) if resume else None
        if ckpt is not None:
            algo.restore_from_path(str(ckpt.resolve()))
            state = json.loads((ckpt / STATE_FILE).read_text())
            _restore_data_positions(algo, state["data_positions"])
            start = int(state["iteration"])
        elif resume:
            print(f"alignray: no checkpoint under {out}/checkpoints; starting from iteration 0")
        metrics = _loop(algo, cfg, out, start, resumed=ckpt is not None)
        if rm_actor is not None:
            metrics["reward_actor"] = ray.get(rm_actor.stats.remote())
            print(
                f"alignray: the shared reward-model actor scored {metrics['reward_actor']['texts']} texts "
                f"in {metrics['reward_actor']['batches']} batches"
            )
        model, tok = policy_model(algo, out / "policy-adapter" if cfg.model.lora.rank else None)
        metrics["policy_dir"] = str(export_pretrained(model, tok, out / "policy"))
        print(
            f"alignray: {metrics['iteration']} iterations; metrics in {out / 'metrics.csv'}, "
            f"policy in {metrics['policy_dir']}"
        )
        return metrics


def _loop(algo, cfg: Config, out: Path, start: int, resumed: bool) -> dict[str, Any]:
    """The iterations from `start` to the end, logging and checkpointing; returns the last metrics."""
    log = RunLog(out, resume_from=start if resumed else None)
    total, every = cfg.ppo.iterations, cfg.run.checkpoint_every
    metrics: dict[str, Any] = {}
    bar = tqdm(range(start, total), initial=start, total=total, desc="PPO", unit="it")
    try:
        for _ in bar:
            metrics = summarize(algo.train())
            log.write(metrics)
            publish_training_metrics(metrics)  # the same row as Prometheus gauges (cluster/telemetry.py)
            it = metrics["iteration"]
            bar.set_postfix(
                rm=f"{metrics['rm_score']:.3f}",
                gold=f"{metrics['gold_score']:.3f}",
                kl=f"{metrics['kl_ref']:.3f}",
                coef=f"{metrics['kl_coef']:.4f}",
                tok_s=f"{metrics['rollout_tokens_per_s']:.0f}",
            )
            if it % every == 0 or it == total:
                metrics["checkpoint"] = str(save_checkpoint(algo, out, it, cfg.run.keep_checkpoints))
    finally:
        log.close()
    if not metrics:  # nothing left to train: report the last logged iteration
        rows = read_metrics(log.path)
        metrics = rows[-1] if rows else {"iteration": start}
    return metrics
