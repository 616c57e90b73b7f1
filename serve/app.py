"""The policy deployment: OpenAI-compatible routes over one generation loop per replica.

Each HTTP request becomes a list of :class:`~serve.engine.GenerationJob` (one per prompt and
choice) handed to the replica's :class:`~serve.scheduler.Scheduler`. With ``serve.batching=continuous``
(the default) the loop admits waiting requests at every decoding step, up to
``serve.max_batch_size`` sequences, and retires finished ones at once; ``static`` forms a batch
only when the replica is idle and runs it to its end, for comparison. Tokens stream back as they
come; a client that goes away cancels its request and frees its slots; a full queue is a 429 with
``Retry-After``. Every response carries ``x-alignray-batch-size`` (sequences in the batch right
after the request joined it) and ``x-alignray-queue-ms`` (how long it waited to join);
``/healthz`` reports the loop's counters and ``/v1/models`` the dtype.

Prometheus metrics (:mod:`serve.metrics`) cover requests, latency, time to first token, tokens,
queue and batch occupancy, and, with a reward model attached, the reward score of a sample of the
served responses. Prompts and responses reach the log only with ``serve.log_requests`` (:mod:`serve.access`).
"""

# No `from __future__ import annotations`: Serve's FastAPI ingress must see the route parameters' real types.
import asyncio
import logging
import random
import sys
from dataclasses import replace

import torch
from fastapi import Response
from fastapi.responses import StreamingResponse
from ray import serve

from envs.models import ModelSettings
from serve.access import KeyRing, RequestLog
from serve.engine import GenerationEngine, GenerationJob
from serve.http import make_app
from serve.metrics import ServeMetrics
from serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    HealthResponse,
    ModelCard,
    ModelList,
    RewardRequest,
    RewardResponse,
    error_responses,
    new_id,
)
from serve.responses import ChatFormat, CompletionFormat, Format, StepStream, sse
from serve.scheduler import Scheduler
from serve.settings import ServeSettings

__all__ = [
    "PolicyServer",
    "ServeSettings",
    "app",
]  # ServeSettings lives in serve.settings; cluster.config imports it here

logger = logging.getLogger(__name__)
app = make_app()
BATCH_HEADER = "x-alignray-batch-size"
QUEUE_HEADER = "x-alignray-queue-ms"
GENERATION_ERRORS = error_responses(400, 401, 404, 413, 429)


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(app)
class PolicyServer:
    """Serves one causal LM (and, through a handle, the reward model) over OpenAI-compatible HTTP."""

    def __init__(
        self,
        model: ModelSettings,
        model_name: str,
        settings: ServeSettings,
        api_key: str = "",
        reward=None,
        reward_name: str | None = None,
        torch_threads: int = 0,
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)  # the replica's process is its own
        self.engine = GenerationEngine.from_spec(
            model, settings.max_tokens_limit, settings.dtype, settings.pack_weights
        )
        self.model_name, self.settings = model_name, settings
        self.reward, self.reward_name = reward, reward_name
        self.metrics = ServeMetrics(settings.max_batch_size, settings.max_queue)
        self.log = RequestLog(settings.log_requests, settings.log_mask)
        self.scheduler = Scheduler(
            self.engine,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            mode=settings.batching,
            batch_wait_s=settings.batch_wait_timeout_s,
            on_step=lambda s: self.metrics.loop(s.queued, len(s.rows), s.counts.steps, s.counts.row_steps),
        )
        self.scheduler.start()
        self._scoring: set[asyncio.Task] = set()
        self._reward_heads: tuple[list[str], list[str]] | None = None
        app.state.keys = KeyRing(api_key, settings.api_keys_file)
        app.state.max_request_bytes = settings.max_request_bytes
        app.state.metrics = self.metrics

    def __del__(self):
        """Serve's graceful shutdown: stop the generation loop (requests still in it get an error)."""
        if hasattr(self, "scheduler"):
            self.scheduler.stop()

    async def check_health(self) -> None:
        """Serve's replica health check: a dead generation loop or a broken model (non-finite logits) fails it."""
        if not self.scheduler.alive:
            raise RuntimeError("the generation loop has stopped")
        await asyncio.to_thread(self.engine.check_health)

    # ---- generation -----------------------------------------------------------------------------

    def _jobs(self, prompts: list[list[int]], body, max_tokens: int | None, default: int) -> list[GenerationJob]:
        """n jobs per prompt (seed + choice index, so choices differ but stay reproducible)."""
        jobs = []
        for ids in prompts:
            job = self.engine.make_job(
                ids,
                max_tokens,
                body.temperature,
                body.top_p,
                body.stop,
                body.seed,
                default_max_tokens=default,
                ignore_eos=body.ignore_eos,
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            )
            jobs += [replace(job, seed=None if body.seed is None else body.seed + j) for j in range(body.n or 1)]
        return jobs

    async def _generate(self, route: str, fmt: Format, body, jobs, prompts: list[str], prompt_tokens: int, response):
        """Queue the jobs, wait for their first step, then answer whole or as server-sent events."""
        stream = StepStream(self.scheduler, jobs)
        stream.submit()
        cid = new_id(fmt.prefix)
        per_job = [p for p in prompts for _ in range(len(jobs) // len(prompts))]

        def on_end() -> None:
            self._finished(cid, route, stream, per_job)

        try:
            first = await stream.__anext__()
        except BaseException:
            stream.close()
            on_end()
            raise
        req = stream.request  # admitted by the step that produced `first`
        headers = {BATCH_HEADER: str(req.batch_rows), QUEUE_HEADER: f"{req.waited * 1000:.1f}"}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = sse(fmt, cid, self.model_name, stream, first, prompt_tokens, include_usage, on_end)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            async for _ in stream:
                pass
        finally:
            stream.close()
            on_end()
        response.headers.update(headers)
        return fmt.whole(cid, self.model_name, stream.choices, stream.choices.usage(prompt_tokens))

    def _finished(self, cid: str, route: str, stream: StepStream, prompts: list[str]) -> None:
        """Metrics, the request log and (sampled) reward scoring of a request that has ended."""
        req, choices = stream.request, stream.choices
        ttft = req.first_token - req.arrived if req.first_token is not None else None
        self.metrics.generation(route, ttft, req.waited, sum(choices.tokens))
        complete = all(f is not None for f in choices.finish)
        self.log.record(cid, route, prompts, choices.texts, tokens=choices.tokens, ttft_s=ttft, complete=complete)
        if self.reward is not None and complete and random.random() < self.settings.reward_sample_rate:
            task = asyncio.get_running_loop().create_task(self._score(choices.texts, prompts))
            self._scoring.add(task)
            task.add_done_callback(self._scoring.discard)

    async def _score(self, texts: list[str], prompts: list[str]) -> None:
        try:
            scores = await self.reward.score.remote(texts, prompts, True)
        except Exception as err:  # noqa: BLE001 - the drift metric must never fail a request
            logger.warning("scoring served responses failed: %r", err)
            return
        self.metrics.rewards(scores)

    async def _heads(self) -> tuple[list[str], list[str]]:
        """(criteria, those that need prompts) of the served reward model, asked once: a deployment's heads never change."""
        if self._reward_heads is None:
            self._reward_heads = (await self.reward.criteria.remote(), await self.reward.prompt_criteria.remote())
        return self._reward_heads

    # ---- routes ---------------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                param="model",
                code="model_not_found",
            )

    @app.get("/healthz", responses=error_responses(503))
    async def healthz(self) -> HealthResponse:
        try:
            await self.check_health()
        except RuntimeError as err:
            raise APIError(503, str(err), type="server_error", code="unhealthy") from err
        return HealthResponse(
            model=self.model_name,
            dtype=self.engine.dtype,
            max_batch_size=self.settings.max_batch_size,
            batching=self.scheduler.snapshot(),
            rewards=self.reward is not None,
            reward_criteria=(await self._heads())[0] if self.reward is not None else [],
        )

    @app.get("/v1/models", responses=error_responses(401))
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, dtype=self.engine.dtype)])

    @app.get("/v1/models/{model_id:path}", responses=error_responses(401, 404))
    async def model(self, model_id: str) -> ModelCard:
        self._check_model(model_id)
        return ModelCard(id=self.model_name, dtype=self.engine.dtype)

    @app.post("/v1/completions", responses=GENERATION_ERRORS)
    async def completions(self, body: CompletionRequest, response: Response):
        self._check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        encoded = [self.engine.encode_prompt(p) for p in prompts]
        jobs = self._jobs(encoded, body, body.max_tokens, default=16)
        tokens = sum(len(ids) for ids in encoded)
        return await self._generate("/v1/completions", CompletionFormat(), body, jobs, prompts, tokens, response)

    @app.post("/v1/chat/completions", responses=GENERATION_ERRORS)
    async def chat_completions(self, body: ChatCompletionRequest, response: Response):
        self._check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        ids = self.engine.encode_chat(messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        jobs = self._jobs([ids], body, max_tokens, default=self.engine.max_tokens_limit)
        last = [messages[-1]["content"]]
        return await self._generate("/v1/chat/completions", ChatFormat(), body, jobs, last, len(ids), response)

    @app.post("/v1/rewards", responses=error_responses(400, 401, 404, 413))
    async def rewards(self, body: RewardRequest) -> RewardResponse:
        if self.reward is None:
            raise APIError(
                404,
                "No reward model is served here; start the server with --reward-model DIR.",
                code="rewards_not_served",
            )
        if body.model is not None and body.model != self.reward_name:
            raise APIError(
                404,
                f"The reward model '{body.model}' does not exist; this server serves '{self.reward_name}'.",
                param="model",
                code="model_not_found",
            )
        criteria, need_prompts = await self._heads()
        criterion = body.criterion or criteria[0]
        if criterion not in criteria:
            raise APIError(
                400,
                f"The reward model '{self.reward_name}' has no criterion '{criterion}'; its criteria: {criteria}.",
                param="criterion",
                code="criterion_not_found",
            )
        if criterion in need_prompts and body.prompts is None:
            raise APIError(
                400,
                f"The criterion '{criterion}' judges each text against its prompt: give 'prompts', one per text.",
                param="prompts",
            )
        scores = await self.reward.score.remote(body.texts, body.prompts, body.normalize, criterion)
        return RewardResponse(model=self.reward_name, criterion=criterion, scores=scores)
