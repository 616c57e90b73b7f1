"""One reward-model server that gathers concurrent calls into batches: a Ray actor in training, a Serve deployment in serving.

:class:`RewardModelServer` is plain asyncio (no Ray needed): ``score`` calls that arrive within
``wait_s`` of each other are scored in one batched forward pass per kind of call (with or
without prompts, normalised or not), off the event loop. It is the only place reward-model
calls are batched:

- training with ``rollout.reward_model_placement='actor'``: the driver starts it as a named Ray
  actor (:func:`start_reward_actor`) before it builds the algorithm and kills it when training
  ends, so it outlives any EnvRunner that crashes; every env calls it through
  :class:`RemoteRewardModel`;
- serving: ``serve.rewards`` deploys the same class behind ``POST /v1/rewards``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from envs.reward_model import RewardModelSettings
from envs.rewards import load_reward_model

ACTOR_NAME = "alignray-reward-model"


class RewardModelServer:
    """Holds the reward model; gathers concurrent ``score`` calls into one batch per kind."""

    def __init__(self, settings: RewardModelSettings, wait_s: float = 0.005, torch_threads: int = 0):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.rm = load_reward_model(settings)
        if torch.cuda.is_available():  # Ray hides every GPU unless the actor asked for one
            self.rm.to("cuda")
        self.batch_size = settings.score_batch_size
        self.wait_s = wait_s
        self.pending: list[tuple[tuple, list[str], list[str] | None, asyncio.Future]] = []
        self.counts = {"texts": 0, "calls": 0, "batches": 0}

    async def score(
        self, responses: list[str], prompts: list[str] | None = None, normalize: bool = False
    ) -> list[float]:
        """``RewardModel.score`` of this request, computed together with whatever else arrived meanwhile."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.pending.append(((prompts is None, normalize), list(responses), prompts, done))
        if len(self.pending) == 1:  # the first request of a batch opens the gathering window
            loop.call_later(self.wait_s, lambda: asyncio.ensure_future(self._flush()))
        return await done

    async def _flush(self) -> None:
        """Score every pending request, one forward batch per (prompts given, normalize)."""
        pending, self.pending = self.pending, []
        groups: dict[tuple, list] = {}
        for req in pending:
            groups.setdefault(req[0], []).append(req)
        for (no_prompts, normalize), reqs in groups.items():
            responses = [r for req in reqs for r in req[1]]
            prompts = None if no_prompts else [p for req in reqs for p in req[2]]
            try:
                scores = await asyncio.to_thread(self.rm.score, responses, prompts, self.batch_size, normalize)
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

    async def check_health(self) -> None:
        """Raise if the reward model returns a non-finite score (Serve's replica health check)."""
        score = (await asyncio.to_thread(self.rm.score, ["health check"]))[0]
        if score != score or abs(score) == float("inf"):
            raise RuntimeError("reward model health check failed: non-finite score")


def start_reward_actor(
    settings: RewardModelSettings,
    num_gpus: float = 0.0,
    resources: dict[str, float] | None = None,
    torch_threads: int = 0,
    name: str = ACTOR_NAME,
) -> Any:
    """Create the named actor (owned by the calling driver) and wait until its model is loaded.

    It asks for no CPU (it idles between rollout steps), ``num_gpus`` GPUs and the custom
    ``resources``; a load error (no trained reward model at ``settings.path``) is raised here.
    """
    import ray

    actor = (
        ray.remote(RewardModelServer)
        .options(
            name=name,
            num_cpus=0,
            num_gpus=num_gpus,
            resources=dict(resources or {}),
        )
        .remote(settings, torch_threads=torch_threads)
    )
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

        missing = (
            f"rollout.reward_model_placement='actor' but no reward-model actor {name!r} is running; "
            "`alignray train` starts it (envs.reward_actor.start_reward_actor) before building the algorithm"
        )
        if not ray.is_initialized():
            raise RuntimeError(missing + " (Ray is not even initialised here)")
        try:
            self.actor = ray.get_actor(name)
        except ValueError as err:
            raise RuntimeError(missing) from err

    def score(
        self, responses: list[str], prompts: list[str] | None = None, batch_size: int = 0, normalize: bool = False
    ) -> list[float]:
        """Scores from the shared actor (it batches with its own ``score_batch_size``)."""
        import ray

        return ray.get(self.actor.score.remote(responses, prompts, normalize))
