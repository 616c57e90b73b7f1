"""Continuous batching: one generation loop per replica that admits and retires sequences at every step.

Plain Python and one thread, no Ray. A :class:`Request` is one HTTP request's sequences (prompts
x ``n``) with a callback. :meth:`Scheduler.submit` queues it (bounded: :class:`QueueFull` when
``max_queue`` sequences already wait). Each iteration of :meth:`Scheduler.run_once`:

1. retires the rows that finished last step or whose request was cancelled (their slots free now);
2. takes waiting requests, first come first served, while their sequences fit in
   ``max_batch_size`` rows (``continuous``), or only when no row is running, after waiting up to
   ``batch_wait_s`` for the batch to fill (``static``, the old ``@serve.batch`` behaviour);
3. runs one decoding step for the running rows and one prefill for the new ones
   (:class:`~serve.kv_batch.RunningBatch`), samples one token per row with each job's own
   temperature, top-p and random stream (:func:`~serve.engine.sample_next`), and calls each
   request's ``emit`` with the text its sequences added (a ``Delta`` per job, ``None`` for a job
   with nothing new), then ``emit(None)`` once all its sequences have ended.

A failure in the model fails the requests in the batch (``emit(exception)``), not the loop.
:func:`stream` and :func:`generate` run jobs to the end without a thread (tests, benchmarks).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from serve.engine import Completion, Decoding, Delta, GenerationEngine, GenerationJob, InputError, sample_next
from serve.kv_batch import RunningBatch
from serve.protocol import BatchStats

logger = logging.getLogger(__name__)

Step = list[Delta | None]
Emit = Callable[[Step | BaseException | None], None]


class QueueFull(Exception):
    """The replica's queue has no room; ``retry_after_s`` estimates when it will."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class Request:
    """One request's sequences, the callback that receives its steps, and its timeline (perf_counter seconds)."""

    jobs: list[GenerationJob]
    emit: Emit
    """Called on the loop's thread: each step's deltas, then None at the end (or an exception)."""
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    batch_rows: int = 0
    """Rows in the running batch right after this request joined it."""
    cancelled: bool = False
    live: int = 0
    """Sequences still decoding."""

    @property
    def waited(self) -> float | None:
        """Seconds from arrival to joining a batch (None while it waits)."""
        return None if self.admitted is None else self.admitted - self.arrived


@dataclass(eq=False)
class _Row:
    request: Request
    choice: int
    dec: Decoding


class Scheduler:
    """The generation loop of one replica: a bounded queue of requests and a running batch of their sequences."""

    def __init__(
        self,
        engine: GenerationEngine,
        max_batch_size: int = 16,
        max_queue: int = 32,
        mode: Literal["continuous", "static"] = "continuous",
        batch_wait_s: float = 0.0,
        on_step: Callable[[Scheduler], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.engine, self.mode, self.batch_wait_s, self.on_step = engine, mode, batch_wait_s, on_step
        self.clock = clock
        """Seconds for the requests' timelines and the static wait (bench/serve_queue_model.py passes a virtual one)."""
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.batch = RunningBatch(engine.model, engine.pad_id)
        self.rows: list[_Row] = []
        self.pending = torch.zeros(0, dtype=torch.long)  # (B,) tokens sampled last step, not yet fed
        self.counts = BatchStats(mode=mode)  # running/waiting/mean_rows are filled in by snapshot()
        self.waiting: deque[Request] = deque()
        self.queued = 0  # sequences in `waiting`
        self._sequence_s = 1.0  # running mean of a sequence's time in the batch, for Retry-After
        self.flush_hooks: list[Callable[[], None]] = []
        """Called on the loop's thread after each iteration (and at stop), once the items of that iteration are sent."""
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- the request side (any thread) ----------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request; InputError if it can never fit a batch, QueueFull if the queue has no room."""
        n = len(request.jobs)
        if n > self.max_batch_size:
            raise InputError(
                f"This request asks for {n} sequences (prompts x n) but the server batches at most "
                f"{self.max_batch_size} (serve.max_batch_size).",
                param="n",
            )
        with self._cv:
            if self.queued + n > self.max_queue:
                self.counts.rejected += 1
                raise QueueFull(
                    f"The server's queue is full ({self.queued} sequences wait, serve.max_queue={self.max_queue}); "
                    "retry later.",
                    self.retry_after_s(),
                )
            self.waiting.append(request)
            self.queued += n
            self._cv.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request: its waiting or running sequences leave at the next step (their slots free)."""
        request.cancelled = True
        with self._cv:
            self._cv.notify()

    def snapshot(self) -> BatchStats:
        """The loop's counters and its state now."""
        c = self.counts
        return c.model_copy(
            update={"mean_rows": c.row_steps / max(c.steps, 1), "running": len(self.rows), "waiting": self.queued}
        )

    @property
    def alive(self) -> bool:
        """Whether the loop thread runs (always True when driven by hand, without :meth:`start`)."""
        return self._thread is None or self._thread.is_alive()

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained one batch: a whole number from 1 to 60."""
        return int(min(60, max(1, math.ceil(self.queued / self.max_batch_size * self._sequence_s))))

    # ---- one iteration (the loop's thread) --------------------------------------------------------

    def run_once(self) -> bool:
        """Retire, admit, decode one step, emit and flush; False when there was nothing to run."""
        try:
            return self._iterate()
        finally:
            self._flush()

    def _iterate(self) -> bool:
        self._retire()
        admitted = self._take(self.clock())
        if not self.rows and not admitted:
            return False
        start = self.clock()
        try:
            new = self._decode(admitted)
        except Exception as err:  # noqa: BLE001 - handed to every request of the batch
            failed = {r.request for r in self.rows} | set(admitted)
            logger.exception("generation step failed; failing the %d requests in the batch", len(failed))
            self._fail(failed, err)
            return True
        self._emit(new)
        self.counts.step_seconds += self.clock() - start
        self._report()
        return True

    def _flush(self) -> None:
        """Call the flush hooks; one that fails (e.g. its event loop has closed) is logged and dropped."""
        for hook in list(self.flush_hooks):
            try:
                hook()
            except Exception:  # noqa: BLE001
                logger.warning("a flush hook failed; dropping it", exc_info=True)
                self.flush_hooks.remove(hook)

    def _report(self) -> None:
        """Call the on_step hook (metrics); its failures are logged, never fatal to the loop."""
        if self.on_step is not None:
            try:
                self.on_step(self)
            except Exception:  # noqa: BLE001
                logger.exception("the on_step hook failed")

    def _retire(self) -> None:
        """Drop the rows that ended last step or were cancelled; tell cancelled requests they are over."""
        keep = [i for i, r in enumerate(self.rows) if r.dec.finish is None and not r.request.cancelled]
        if len(keep) == len(self.rows):
            return
        now = self.clock()
        for r in self.rows:
            if r.request.cancelled and r.request.live > 0:
                r.request.live = 0
                self.counts.cancelled += 1
                self._send(r.request, None)
            elif r.dec.finish is not None:
                self._sequence_s += 0.1 * (now - r.request.admitted - self._sequence_s)
        self.rows = [self.rows[i] for i in keep]
        self.pending = self.pending[keep]
        self.batch.keep(keep)

    def _take(self, now: float) -> list[Request]:
        """The waiting requests that join the batch now (FIFO, whole requests)."""
        with self._cv:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self.queued -= len(req.jobs)
                self.counts.cancelled += 1
                self._send(req, None)
            if self.admit_delay(now) != 0:
                return []
            taken, rows = [], len(self.rows)
            while self.waiting and rows + len(self.waiting[0].jobs) <= self.max_batch_size:
                taken.append(self.waiting.popleft())
                rows += len(taken[-1].jobs)
                self.queued -= len(taken[-1].jobs)
            return taken

    def admit_delay(self, now: float) -> float | None:
        """Seconds to wait before admitting (0 = now), or None when nothing waits or nothing may join yet."""
        if not self.waiting:
            return None
        if self.mode == "continuous":
            return 0.0
        if self.rows:
            return None  # static: a batch runs to its end before the next one forms
        if self.queued >= self.max_batch_size:
            return 0.0
        return max(0.0, self.waiting[0].arrived + self.batch_wait_s - now)

    def _decode(self, admitted: list[Request]) -> dict[Request, Step]:
        """One step of the running rows plus the prefill of the admitted ones; sample; advance each row's text."""
        prompts = [job.prompt_ids for req in admitted for job in req.jobs]
        if self.rows and prompts:
            logits = self.batch.step_and_admit(self.pending, prompts)  # (B_old + B_new, V)
        else:
            logits = self.batch.step(self.pending) if self.rows else self.batch.admit(prompts)
        now = self.clock()
        for req in admitted:
            req.admitted, req.live = now, len(req.jobs)
            self.rows += [_Row(req, i, self.engine.start(job)) for i, job in enumerate(req.jobs)]
            self.counts.requests += 1
            self.counts.sequences += len(req.jobs)
        for req in admitted:
            req.batch_rows = len(self.rows)
        with torch.inference_mode():
            self.pending = sample_next(logits, [r.dec.job for r in self.rows], [r.dec.generator for r in self.rows])
        steps: dict[Request, Step] = {}
        for row, token in zip(self.rows, self.pending.tolist()):
            step = steps.setdefault(row.request, [None] * len(row.request.jobs))
            step[row.choice] = self.engine.advance(row.dec, token)
            row.request.live -= row.dec.finish is not None
        c = self.counts
        c.steps, c.row_steps, c.max_rows = c.steps + 1, c.row_steps + len(self.rows), max(c.max_rows, len(self.rows))
        return steps

    def _emit(self, steps: dict[Request, Step]) -> None:
        now = self.clock()
        for req, step in steps.items():
            if req.first_token is None:
                req.first_token = now
            self._send(req, step)
            if req.live == 0:
                self._send(req, None)

    def _send(self, req: Request, item: Step | BaseException | None) -> None:
        """Hand one item to a request; a receiver that has gone away cancels it."""
        try:
            req.emit(item)
        except Exception:  # noqa: BLE001 - e.g. its event loop has closed
            req.cancelled = True

    def _fail(self, requests: set[Request], err: BaseException) -> None:
        for req in requests:
            req.live = 0
            self.counts.failed += 1
            self._send(req, err)
        self.rows, self.pending = [], self.pending[:0]
        self.batch = RunningBatch(self.engine.model, self.engine.pad_id)

    # ---- the loop thread ----------------------------------------------------------------------------

    def start(self) -> None:
        """Run the loop in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name="alignray-generation", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stopping:
            try:
                if self.run_once():
                    continue
            except Exception:  # noqa: BLE001 - a bug in one iteration must not stop serving
                logger.exception("generation loop iteration failed")
            with self._cv:
                delay = self.admit_delay(self.clock())
                if delay != 0 and not self._stopping:
                    self._cv.wait(timeout=1.0 if delay is None else min(delay, 1.0))
            if not self.rows:  # idle: keep the gauges fresh (Ray drops a gauge that is not re-set)
                self._report()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still waiting or running get an error."""
        self._stopping = True
        with self._cv:
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            waiting, self.waiting, self.queued = list(self.waiting), deque(), 0
        self._fail({r.request for r in self.rows} | set(waiting), RuntimeError("the server is shutting down"))
        self._flush()


def stream(engine: GenerationEngine, jobs: list[GenerationJob]) -> Iterator[Step]:
    """Generate jobs as one request, without a thread; per step, each job's Delta (None once it has ended)."""
    out: list = []
    scheduler = Scheduler(engine, max_batch_size=max(1, len(jobs)), max_queue=max(1, len(jobs)))
    scheduler.submit(Request(list(jobs), out.append))
    while scheduler.run_once() or out:
        while out:
            item = out.pop(0)
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def generate(engine: GenerationEngine, jobs: list[GenerationJob]) -> list[Completion]:
    """Run jobs to the end and gather each one's text."""
    texts, last = [""] * len(jobs), [None] * len(jobs)
    for step in stream(engine, jobs):
        for i, d in enumerate(step):
            if d is not None:
                texts[i] += d.text
                last[i] = d
    return [
        Completion(
            text=t,
            finish_reason=d.finish_reason,
            prompt_tokens=len(j.prompt_ids),
            completion_tokens=d.completion_tokens,
        )
        for t, d, j in zip(texts, last, jobs)
    ]
