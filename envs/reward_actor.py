"""One reward-model server that gathers concurrent calls into batches: a Ray actor in training, a Serve deployment in serving.

:class:`RewardModelServer` is plain asyncio (no Ray needed): ``score`` calls that arrive within
``wait_s`` of each other are scored in one batched forward pass per kind of call (with or
without prompts, normalised or not, which head, or every head for ``score_all``), off the event
loop. It is the only place reward-model
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
ALL_HEADS = "*"
"""The criterion key of a ``score_all`` call in a batch kind (never a criterion name)."""


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
        self,
        responses: list[str],
        prompts: list[str] | None = None,
        normalize: bool = False,
        criterion: str | None = None,
    ) -> list[float]:
        """``RewardModel.score`` of this request by one head (None = the first), batched with whatever else arrived."""
        criterion = self.rm.head_name(criterion)  # an unknown head fails its caller now, not its batch
        return await self._submit((prompts is None, normalize, criterion), responses, prompts)

    async def score_all(
        self, responses: list[str], prompts: list[str] | None = None, normalize: bool = False
    ) -> dict[str, list[float]]:
        """``RewardModel.score_all`` of this request (every head), batched with whatever else arrived."""
        return await self._submit((prompts is None, normalize, ALL_HEADS), responses, prompts)

    async def criteria(self) -> list[str]:
        """The reward model's heads, the default first."""
        return list(self.rm.criteria)

    async def prompt_criteria(self) -> list[str]:
        """The heads that judge a response against its prompt (they cannot score without prompts)."""
        return [c for c in self.rm.criteria if c in self.rm.prompt_heads]

    async def _submit(self, kind: tuple, responses: list[str], prompts: list[str] | None):
        """Queue one request of a kind and wait for its share of the batch's result."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.pending.append((kind, list(responses), prompts, done))
        if len(self.pending) == 1:  # the first request of a batch opens the gathering window
            loop.call_later(self.wait_s, lambda: asyncio.ensure_future(self._flush()))
        return await done

    def _run(self, kind: tuple, responses: list[str], prompts: list[str] | None):
        """One forward batch of a kind: a list of scores, or a dict of them for every head."""
        _, normalize, criterion = kind
        if criterion == ALL_HEADS:
            return self.rm.score_all(responses, prompts, self.batch_size, normalize)
        return self.rm.score(responses, prompts, self.batch_size, normalize, criterion)

    async def _flush(self) -> None:
        """Score every pending request, one forward batch per (prompts given, normalize, criterion)."""
        pending, self.pending = self.pending, []
        groups: dict[tuple, list] = {}
        for req in pending:
            groups.setdefault(req[0], []).append(req)
        for kind, reqs in groups.items():
            responses = [r for req in reqs for r in req[1]]
            prompts = None if kind[0] else [p for req in reqs for p in req[2]]
            try:
                scores = await asyncio.to_thread(self._run, kind, responses, prompts)
            except Exception as err:  # noqa: BLE001 - handed back to every caller of the batch
                for req in reqs:
                    if not req[3].done():
                        req[3].set_exception(err)
                continue
            start = 0
            for req in reqs:
                if not req[3].done():  # a caller that gave up (cancelled) gets nothing
                    req[3].set_result(_slice(scores, start, start + len(req[1])))
                start += len(req[1])
            self.counts["texts"] += len(responses)
            self.counts["calls"] += len(reqs)
            self.counts["batches"] += 1

    async def stats(self) -> dict[str, int]:
        """So far: ``texts`` scored, ``calls`` answered, ``batches`` (forward groups) run."""
        return dict(self.counts)

    async def check_health(self) -> None:
        """Raise if any head returns a non-finite score (Serve's replica health check)."""
        scores = await asyncio.to_thread(self.rm.score_all, ["health check"], ["health check"])
        if any(s[0] != s[0] or abs(s[0]) == float("inf") for s in scores.values()):
            raise RuntimeError("reward model health check failed: non-finite score")


def _slice(scores: list[float] | dict[str, list[float]], start: int, end: int):
    """One request's share of a batch's scores (of every head for a ``score_all`` batch)."""
    if isinstance(scores, dict):
        return {c: s[start:end] for c, s in scores.items()}
    return scores[start:end]


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
    """Drop-in for ``RewardModel.score``/``score_all`` that calls the shared actor (which must already exist)."""

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
        self.criteria: list[str] = ray.get(self.actor.criteria.remote())

    def score(
        self,
        responses: list[str],
        prompts: list[str] | None = None,
        batch_size: int = 0,
        normalize: bool = False,
        criterion: str | None = None,
    ) -> list[float]:
        """One head's scores from the shared actor (it batches with its own ``score_batch_size``)."""
        import ray

        return ray.get(self.actor.score.remote(responses, prompts, normalize, criterion))

    def score_all(
        self, responses: list[str], prompts: list[str] | None = None, batch_size: int = 0, normalize: bool = False
    ) -> dict[str, list[float]]:
        """Every head's scores from the shared actor in one call."""
        import ray

        return ray.get(self.actor.score_all.remote(responses, prompts, normalize))
