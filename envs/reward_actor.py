"""One shared reward model in a Ray actor, for ``rollout.reward_model_placement='actor'``.

The driver owns the actor: ``policies.train`` calls :func:`start_reward_actor` before it builds
the algorithm and :func:`stop_reward_actor` when training ends, so the actor outlives any
EnvRunner that crashes and is restarted. Every env gets a :class:`RemoteRewardModel`, which
finds the actor by name (in the driver's namespace) and calls it instead of loading its own copy.

The actor is an async actor: ``score`` calls that arrive within ``wait_s`` of each other (from
several EnvRunners) are scored in one batched forward pass.
"""

from __future__ import annotations

import asyncio
from typing import Any

ACTOR_NAME = "alignray-reward-model"


class RewardModelServer:
    """Holds the reward model; gathers concurrent ``score`` calls into one batch.

    Plain Python (no Ray needed): :func:`start_reward_actor` runs it as an actor.
    """

    def __init__(self, path: str, backbone: str, wait_s: float = 0.005, torch_threads: int = 0):
        import torch

        from envs.rewards import load_reward_model

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.rm = load_reward_model(path, backbone)
        if torch.cuda.is_available():  # Ray hides every GPU unless the actor asked for one
            self.rm.to("cuda")
        self.wait_s = wait_s
        self.pending: list[tuple[tuple, list[str], list[str] | None, asyncio.Future]] = []
        self.counts = {"texts": 0, "calls": 0, "batches": 0}

    async def score(self, responses: list[str], prompts: list[str] | None = None, batch_size: int = 64,
                    normalize: bool = False) -> list[float]:
        """``RewardModel.score`` of this request, computed together with whatever else arrived meanwhile."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.pending.append(((prompts is None, batch_size, normalize), list(responses), prompts, done))
        if len(self.pending) == 1:  # the first request of a batch opens the gathering window
            loop.call_later(self.wait_s, self._flush)
        return await done

    def _flush(self) -> None:
        """Score every pending request, one forward batch per (prompts given, batch_size, normalize)."""
        pending, self.pending = self.pending, []
        groups: dict[tuple, list] = {}
        for req in pending:
            groups.setdefault(req[0], []).append(req)
        for (no_prompts, batch_size, normalize), reqs in groups.items():
            responses = [r for req in reqs for r in req[1]]
            prompts = None if no_prompts else [p for req in reqs for p in req[2]]
            try:
                scores = self.rm.score(responses, prompts, batch_size=batch_size, normalize=normalize)
            except Exception as err:  # noqa: BLE001 - handed back to every caller of the batch
                for req in reqs:
                    if not req[3].done():
                        req[3].set_exception(err)
                continue
            start = 0
            for req in reqs:
                if not req[3].done():  # a caller that gave up (cancelled) gets nothing
                    req[3].set_result(scores[start : start + len(req[1])])
                start += len(req[1])
            self.counts["texts"] += len(responses)
            self.counts["calls"] += len(reqs)
            self.counts["batches"] += 1

    async def stats(self) -> dict[str, int]:
        """So far: ``texts`` scored, ``calls`` answered, ``batches`` (forward groups) run."""
        return dict(self.counts)


def start_reward_actor(path: str, backbone: str, num_gpus: float = 0.0, resources: dict[str, float] | None = None,
                       torch_threads: int = 0, name: str = ACTOR_NAME) -> Any:
    """Create the named actor (owned by the calling driver) and wait until its model is loaded.

    It asks for no CPU (it idles between rollout steps), ``num_gpus`` GPUs and the custom
    ``resources``; a load error (no trained reward model at `path`) is raised here.
    """
    import ray

    actor = ray.remote(RewardModelServer).options(
        name=name, num_cpus=0, num_gpus=num_gpus, resources=dict(resources or {}),
    ).remote(path, backbone, torch_threads=torch_threads)
    ray.get(actor.stats.remote())
    return actor


def stop_reward_actor(actor: Any) -> dict[str, int]:
    """Kill the actor; returns what it scored (empty if it was already gone)."""
    import ray

    try:
        stats = ray.get(actor.stats.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - already dead or unreachable: nothing to report
        stats = {}
    ray.kill(actor, no_restart=True)
    return stats


class RemoteRewardModel:
    """Drop-in for ``RewardModel.score`` that calls the shared actor (which must already exist)."""

    def __init__(self, name: str = ACTOR_NAME):
        import ray

        missing = (f"rollout.reward_model_placement='actor' but no reward-model actor {name!r} is running; "
                   "`alignray train` starts it (envs.reward_actor.start_reward_actor) before building the algorithm")
        if not ray.is_initialized():
            raise RuntimeError(missing + " (Ray is not even initialised here)")
        try:
            self.actor = ray.get_actor(name)
        except ValueError as err:
            raise RuntimeError(missing) from err

    def score(self, responses: list[str], prompts: list[str] | None = None, batch_size: int = 64,
              normalize: bool = False) -> list[float]:
        import ray

        return ray.get(self.actor.score.remote(responses, prompts, batch_size, normalize))
