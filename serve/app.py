"""The policy deployment: OpenAI-compatible routes over a batched :class:`~serve.engine.GenerationEngine`.

Each HTTP request becomes a list of :class:`~serve.engine.GenerationJob` (one per prompt and
choice). ``@serve.batch`` gathers the job lists of concurrent requests (up to
``serve.max_batch_size`` jobs; 1 = batching off) into one call of :meth:`PolicyServer._run_batch`,
which runs a single batched generation and streams each step back to every request. Streaming
and non-streaming requests share the same batches; a non-streaming request just collects the
steps. Every response carries ``x-alignray-batch-size`` (requests that shared its generation),
and ``/healthz`` reports the batch-size histogram of the replica.
"""

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import torch
from fastapi import Response
from fastapi.responses import StreamingResponse
from pydantic import Field, model_validator
from ray import serve

from envs.models import ModelSettings
from envs.settings import Settings
from serve.engine import Delta, GenerationEngine, GenerationJob
from serve.http import make_app
from serve.protocol import (
    APIError,
    AssistantMessage,
    BatchStats,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    RewardRequest,
    RewardResponse,
    Usage,
    error_responses,
    new_id,
)

app = make_app()
BATCH_HEADER = "x-alignray-batch-size"


class ServeSettings(Settings):
    """The ``serve`` section: the HTTP endpoint, its limits, batching and replicas."""

    host: str = "127.0.0.1"
    """Address the HTTP proxy binds; loopback unless you mean to expose it."""
    port: int = Field(8000, ge=0, le=65535)
    """HTTP port."""
    api_key: str = ""
    """Bearer token required on every request when set (or env ALIGNRAY_API_KEY)."""
    max_tokens_limit: int = Field(256, ge=1)
    """Largest max_tokens a request may ask for."""
    max_request_bytes: int = Field(1_000_000, ge=1024)
    """Largest request body accepted."""
    max_batch_size: int = Field(16, ge=1)
    """Requests gathered into one batched generation (1 = batching off)."""
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    """How long a batch waits to fill."""
    min_replicas: int = Field(1, ge=0)
    """Autoscaling lower bound."""
    max_replicas: int = Field(1, ge=1)
    """Autoscaling upper bound."""
    target_ongoing_requests: int = Field(16, ge=1)
    """Autoscaling target of in-flight requests per replica."""
    num_cpus_per_replica: float = Field(1.0, ge=0)
    """CPUs per model replica."""
    num_gpus_per_replica: float = Field(0.0, ge=0)
    """GPUs per model replica."""
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests one replica accepts at once (queued ones included); must be >= max_batch_size for batches to fill."""
    model_name: str = ""
    """Model id clients pass as `model` (empty = the directory name, or 'smollm2')."""

    @model_validator(mode="after")
    def _consistent(self) -> "ServeSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        return self


@dataclass
class _Step:
    """One decoding step as one request sees it."""

    batch_requests: int
    deltas: list[Delta | None]


def _rows(requests: list[list[GenerationJob]]) -> int:
    """Batch size as ``@serve.batch`` counts it: generated sequences, not HTTP requests."""
    return sum(len(r) for r in requests)


@dataclass
class _Choices:
    """Accumulates the streamed deltas of a request's choices."""

    texts: list[str]
    finish: list[str | None]
    tokens: list[int]

    @classmethod
    def empty(cls, n: int) -> "_Choices":
        return cls([""] * n, [None] * n, [0] * n)

    def add(self, deltas: list[Delta | None]) -> None:
        for i, d in enumerate(deltas):
            if d is not None:
                self.texts[i] += d.text
                self.finish[i] = d.finish_reason
                self.tokens[i] = d.completion_tokens


def _usage(prompt_tokens: int, choices: _Choices) -> Usage:
    completion = sum(choices.tokens)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


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
        self.engine = GenerationEngine.from_spec(model, max_tokens_limit=settings.max_tokens_limit)
        self.model_name = model_name
        self.max_batch_size = settings.max_batch_size
        self.reward, self.reward_name = reward, reward_name
        self.stats = BatchStats()
        app.state.api_key = api_key
        app.state.max_request_bytes = settings.max_request_bytes
        self._idle = asyncio.Event()  # set while no batched generation runs
        self._idle.set()
        self._run_batch.set_max_batch_size(self.max_batch_size)
        self._run_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def check_health(self) -> None:
        """Serve's replica health check: a broken model (non-finite logits) fails it."""
        await asyncio.to_thread(self.engine.check_health)

    # ---- batching -----------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=_rows)
    async def _run_batch(self, requests: list[list[GenerationJob]]) -> AsyncIterator[list]:
        """One batched generation for all gathered requests; per step, each request's deltas."""
        self._record(len(requests))
        self._idle.clear()
        try:
            steps = self.engine.stream([job for jobs in requests for job in jobs])
            while (step := await asyncio.to_thread(next, steps, None)) is not None:
                out, k = [], 0
                for jobs in requests:
                    part, k = step[k : k + len(jobs)], k + len(jobs)
                    out.append(StopIteration if all(d is None for d in part) else _Step(len(requests), part))
                yield out
        finally:
            self._idle.set()

    def _record(self, n_requests: int) -> None:
        s = self.stats
        s.batches += 1
        s.requests += n_requests
        s.max_requests_per_batch = max(s.max_requests_per_batch, n_requests)
        s.sizes = dict(Counter(s.sizes) + Counter({str(n_requests): 1}))

    async def _submit(self, jobs: list[GenerationJob]) -> tuple[int, AsyncIterator[list[Delta | None]]]:
        """Queue the jobs for batching; wait for the first step -> (requests in the batch, steps)."""
        if len(jobs) > self.max_batch_size:
            raise APIError(
                400,
                f"This request asks for {len(jobs)} sequences (prompts x n) but the server "
                f"batches at most {self.max_batch_size} (serve.max_batch_size).",
                param="n",
            )
        # Join the queue only when no generation runs: @serve.batch forms the next batch as soon as
        # its first request arrives, so requests trickling in during a long generation would
        # otherwise make a small batch that then waits; gathered here, they wake together.
        await self._idle.wait()
        gen = self._run_batch(jobs)
        first: _Step = await gen.__anext__()

        async def steps() -> AsyncIterator[list[Delta | None]]:
            yield first.deltas
            async for step in gen:
                yield step.deltas

        return first.batch_requests, steps()

    # ---- routes -------------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                param="model",
                code="model_not_found",
            )

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

    @app.get("/healthz", responses=error_responses(503))
    async def healthz(self) -> HealthResponse:
        try:
            await self.check_health()
        except RuntimeError as err:
            raise APIError(503, str(err), type="server_error", code="unhealthy") from err
        return HealthResponse(
            model=self.model_name,
            max_batch_size=self.max_batch_size,
            batching=self.stats,
            rewards=self.reward is not None,
        )

    @app.get("/v1/models", responses=error_responses(401))
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name)])

    @app.get("/v1/models/{model_id:path}", responses=error_responses(401, 404))
    async def model(self, model_id: str) -> ModelCard:
        self._check_model(model_id)
        return ModelCard(id=self.model_name)

    @app.post("/v1/completions", responses=error_responses(400, 401, 404, 413))
    async def completions(self, body: CompletionRequest, response: Response):
        self._check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        encoded = [self.engine.encode_prompt(p) for p in prompts]
        jobs = self._jobs(encoded, body, body.max_tokens, default=16)
        batch, steps = await self._submit(jobs)
        headers = {BATCH_HEADER: str(batch)}
        prompt_tokens = sum(len(ids) for ids in encoded)
        if body.stream:
            return StreamingResponse(
                self._stream_completion(body, steps, len(jobs), prompt_tokens),
                media_type="text/event-stream",
                headers=headers,
            )
        choices = _Choices.empty(len(jobs))
        async for deltas in steps:
            choices.add(deltas)
        response.headers.update(headers)
        return CompletionResponse(
            model=self.model_name,
            usage=_usage(prompt_tokens, choices),
            choices=[
                CompletionChoice(index=i, text=t, finish_reason=f)
                for i, (t, f) in enumerate(zip(choices.texts, choices.finish))
            ],
        )

    async def _stream_completion(self, body, steps, n_jobs: int, prompt_tokens: int) -> AsyncIterator[str]:
        cid, created, choices = new_id("cmpl"), int(time.time()), _Choices.empty(n_jobs)
        async for deltas in steps:
            choices.add(deltas)
            out = [
                CompletionChoice(index=i, text=d.text, finish_reason=d.finish_reason)
                for i, d in enumerate(deltas)
                if d is not None and (d.text or d.finish_reason)
            ]
            if out:
                yield _sse(
                    CompletionResponse(id=cid, created=created, model=self.model_name, choices=out).model_dump_json(
                        exclude={"usage"}
                    )
                )
        if body.stream_options and body.stream_options.include_usage:
            yield _sse(
                CompletionResponse(
                    id=cid, created=created, model=self.model_name, choices=[], usage=_usage(prompt_tokens, choices)
                ).model_dump_json()
            )
        yield _sse("[DONE]")

    @app.post("/v1/chat/completions", responses=error_responses(400, 401, 404, 413))
    async def chat_completions(self, body: ChatCompletionRequest, response: Response):
        self._check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        ids = self.engine.encode_chat(messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        jobs = self._jobs([ids], body, max_tokens, default=self.engine.max_tokens_limit)
        batch, steps = await self._submit(jobs)
        headers = {BATCH_HEADER: str(batch)}
        if body.stream:
            return StreamingResponse(
                self._stream_chat(body, steps, len(jobs), len(ids)), media_type="text/event-stream", headers=headers
            )
        choices = _Choices.empty(len(jobs))
        async for deltas in steps:
            choices.add(deltas)
        response.headers.update(headers)
        return ChatCompletionResponse(
            model=self.model_name,
            usage=_usage(len(ids), choices),
            choices=[
                ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=f)
                for i, (t, f) in enumerate(zip(choices.texts, choices.finish))
            ],
        )

    async def _stream_chat(self, body, steps, n_jobs: int, prompt_tokens: int) -> AsyncIterator[str]:
        cid, created, choices = new_id("chatcmpl"), int(time.time()), _Choices.empty(n_jobs)

        def chunk(out: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            c = ChatCompletionChunk(id=cid, created=created, model=self.model_name, choices=out, usage=usage)
            return _sse(c.model_dump_json(exclude=None if usage else {"usage"}))

        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(n_jobs)])
        async for deltas in steps:
            choices.add(deltas)
            out = [
                ChatChunkChoice(index=i, delta=ChatDelta(content=d.text or None), finish_reason=d.finish_reason)
                for i, d in enumerate(deltas)
                if d is not None and (d.text or d.finish_reason)
            ]
            if out:
                yield chunk(out)
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], _usage(prompt_tokens, choices))
        yield _sse("[DONE]")

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
        scores = await self.reward.score.remote(body.texts, body.prompts, body.normalize)
        return RewardResponse(model=self.reward_name, scores=scores)
