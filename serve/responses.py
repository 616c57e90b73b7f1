"""From a request's generation steps to OpenAI bodies: the bridge from the loop's thread, whole responses, SSE.

:class:`StepStream` hands a request's steps from the generation loop's thread to the event loop
(an async iterator); closing it before the end cancels the request, which frees its batch slots
at the next step. :class:`CompletionFormat` and :class:`ChatFormat` are the two shapes of the
same thing (a whole response, a streamed chunk), so the routes share one path, and :func:`sse`
streams any of them as server-sent events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pydantic import BaseModel

from serve.engine import Delta, GenerationJob
from serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    Usage,
)
from serve.scheduler import Request, Scheduler, Step


class StepStream:
    """One request's steps as an async iterator on the event loop; :meth:`close` before the end cancels it."""

    def __init__(self, scheduler: Scheduler, jobs: list[GenerationJob]):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.scheduler = scheduler
        self.request = Request(jobs, emit=lambda item: loop.call_soon_threadsafe(self.queue.put_nowait, item))
        self.choices = Choices.empty(len(jobs))
        self.done = False

    def submit(self) -> None:
        """Queue the request (raises QueueFull or InputError)."""
        self.scheduler.submit(self.request)

    def __aiter__(self) -> StepStream:
        return self

    async def __anext__(self) -> Step:
        if self.done:
            raise StopAsyncIteration
        item = await self.queue.get()
        if item is None or isinstance(item, BaseException):
            self.done = True
            if item is None:
                raise StopAsyncIteration
            raise item
        self.choices.add(item)
        return item

    def close(self) -> None:
        """Cancel the request if it has not ended (the client went away)."""
        if not self.done:
            self.done = True
            self.scheduler.cancel(self.request)


@dataclass
class Choices:
    """The text, finish reason and token count so far of each of a request's sequences."""

    texts: list[str]
    finish: list[str | None]
    tokens: list[int]

    @classmethod
    def empty(cls, n: int) -> Choices:
        return cls([""] * n, [None] * n, [0] * n)

    def add(self, deltas: Step) -> None:
        for i, d in enumerate(deltas):
            if d is not None:
                self.texts[i] += d.text
                self.finish[i] = d.finish_reason
                self.tokens[i] = d.completion_tokens

    def usage(self, prompt_tokens: int) -> Usage:
        completion = sum(self.tokens)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def _news(deltas: Step) -> list[tuple[int, Delta]]:
    """The (choice, delta) pairs of a step that carry text or an ending."""
    return [(i, d) for i, d in enumerate(deltas) if d is not None and (d.text or d.finish_reason)]


class CompletionFormat:
    """``/v1/completions`` bodies."""

    prefix = "cmpl"

    def whole(self, cid: str, model: str, choices: Choices, usage: Usage) -> BaseModel:
        out = [
            CompletionChoice(index=i, text=t, finish_reason=f)
            for i, (t, f) in enumerate(zip(choices.texts, choices.finish))
        ]
        return CompletionResponse(id=cid, model=model, usage=usage, choices=out)

    def opening(self, cid: str, created: int, model: str, n: int) -> BaseModel | None:
        return None

    def chunk(self, cid: str, created: int, model: str, deltas: Step, usage: Usage | None = None) -> BaseModel | None:
        out = [CompletionChoice(index=i, text=d.text, finish_reason=d.finish_reason) for i, d in _news(deltas)]
        return (
            CompletionResponse(id=cid, created=created, model=model, choices=out, usage=usage) if out or usage else None
        )


class ChatFormat:
    """``/v1/chat/completions`` bodies."""

    prefix = "chatcmpl"

    def whole(self, cid: str, model: str, choices: Choices, usage: Usage) -> BaseModel:
        out = [
            ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=f)
            for i, (t, f) in enumerate(zip(choices.texts, choices.finish))
        ]
        return ChatCompletionResponse(id=cid, model=model, usage=usage, choices=out)

    def opening(self, cid: str, created: int, model: str, n: int) -> BaseModel | None:
        out = [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")) for i in range(n)]
        return ChatCompletionChunk(id=cid, created=created, model=model, choices=out)

    def chunk(self, cid: str, created: int, model: str, deltas: Step, usage: Usage | None = None) -> BaseModel | None:
        out = [
            ChatChunkChoice(index=i, delta=ChatDelta(content=d.text or None), finish_reason=d.finish_reason)
            for i, d in _news(deltas)
        ]
        return (
            ChatCompletionChunk(id=cid, created=created, model=model, choices=out, usage=usage)
            if out or usage
            else None
        )


Format = CompletionFormat | ChatFormat


def _event(payload: BaseModel | str) -> str:
    """One server-sent event; a chunk without usage leaves the field out, as OpenAI's do."""
    if not isinstance(payload, str):
        payload = payload.model_dump_json(exclude={"usage"} if payload.usage is None else None)
    return f"data: {payload}\n\n"


async def sse(
    fmt: Format,
    cid: str,
    model: str,
    stream: StepStream,
    first: Step,
    prompt_tokens: int,
    include_usage: bool,
    on_end: Callable[[], None],
) -> AsyncIterator[str]:
    """Server-sent events of a request (its first step already taken); cancels it if the client goes away."""
    created = int(time.time())
    try:
        if (opening := fmt.opening(cid, created, model, len(first))) is not None:
            yield _event(opening)
        if (chunk := fmt.chunk(cid, created, model, first)) is not None:
            yield _event(chunk)
        async for deltas in stream:
            if (chunk := fmt.chunk(cid, created, model, deltas)) is not None:
                yield _event(chunk)
        if include_usage:
            yield _event(fmt.chunk(cid, created, model, [], stream.choices.usage(prompt_tokens)))
        yield _event("[DONE]")
    finally:
        stream.close()
        on_end()
