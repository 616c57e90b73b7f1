"""From a request's generation steps to OpenAI bodies: the bridge from the loop's thread, whole responses, SSE.

:class:`Outbox` carries the items the generation loop hands to requests over to the event loop:
the loop posts one item per request during a step, then flushes once, so the event loop wakes up
once per step for all its requests (not once per request and token). :class:`StepStream` is one
request's steps as an async iterator; when it falls behind, the steps waiting for it come out
merged into one (:func:`merge_steps`: fewer, larger chunks instead of a backlog). Closing it
before the end cancels the request, which frees its batch slots at the next step.
:class:`CompletionFormat` and :class:`ChatFormat` are the two shapes of the same thing (a whole
response, a streamed chunk), so the routes share one path, and :func:`sse` streams any of them as
server-sent events.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
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

Item = Step | BaseException | None
"""What the loop hands a request: a step's deltas, then None at the end (or an exception)."""


class Outbox:
    """The generation loop's items for the requests of one event loop: gathered during a step, delivered with one wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: list[tuple[StepStream, Item]] = []
        self._lock = threading.Lock()
        self._woken = False  # a delivery is scheduled and has not run yet

    def post(self, stream: StepStream, item: Item) -> None:
        """(loop thread) Hold an item for a stream until the next :meth:`flush`; RuntimeError if the event loop has closed."""
        if self.loop.is_closed():
            raise RuntimeError("the event loop of this request has closed")
        with self._lock:
            self._items.append((stream, item))

    def flush(self) -> None:
        """(loop thread) Wake the event loop once to deliver everything posted so far (nothing if one wake-up is pending)."""
        with self._lock:
            if not self._items or self._woken:
                return
            self._woken = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._woken = self._items, [], False
        for stream, item in items:
            stream.put(item)


def outbox(scheduler: Scheduler) -> Outbox:
    """The outbox from the scheduler's loop to the running event loop, made and hooked to the scheduler once."""
    loop = asyncio.get_running_loop()
    for hook in list(scheduler.flush_hooks):
        box = getattr(hook, "__self__", None)
        if isinstance(box, Outbox) and box.loop is loop:
            return box
    box = Outbox(loop)
    scheduler.flush_hooks.append(box.flush)
    return box


def merge_steps(steps: list[Step]) -> Step:
    """Consecutive steps of one request as one: each job's texts joined, its last finish reason and token count."""
    if len(steps) == 1:
        return steps[0]
    merged: Step = []
    for deltas in zip(*steps):
        live = [d for d in deltas if d is not None]
        merged.append(
            Delta("".join(d.text for d in live), live[-1].finish_reason, live[-1].completion_tokens) if live else None
        )
    return merged


class StepStream:
    """One request's steps as an async iterator on the event loop; :meth:`close` before the end cancels it."""

    def __init__(self, scheduler: Scheduler, jobs: list[GenerationJob]):
        box = outbox(scheduler)
        self.items: deque[Item] = deque()
        self.ready = asyncio.Event()
        self.scheduler = scheduler
        self.request = Request(jobs, emit=lambda item: box.post(self, item))
        self.choices = Choices.empty(len(jobs))
        self.done = False

    def submit(self) -> None:
        """Queue the request (raises QueueFull or InputError)."""
        self.scheduler.submit(self.request)

    def put(self, item: Item) -> None:
        """(event loop) One item from the generation loop."""
        self.items.append(item)
        self.ready.set()

    def __aiter__(self) -> StepStream:
        return self

    async def __anext__(self) -> Step:
        """The steps that have arrived, merged into one (waits for at least one); stops at the end."""
        if self.done:
            raise StopAsyncIteration
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        steps = []
        while self.items and isinstance(self.items[0], list):
            steps.append(self.items.popleft())
        if not steps:  # the end (None) or an error, after every step before it was returned
            item = self.items.popleft()
            self.done = True
            if item is None:
                raise StopAsyncIteration
            raise item
        step = merge_steps(steps)
        self.choices.add(step)
        return step

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
