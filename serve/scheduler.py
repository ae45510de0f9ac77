"""One scheduler per model version: requests wait in its queue, share runs, and leave when their client does.

Scoring (``input_ids``): the requests in the queue whose :meth:`Engine.batch_key` agrees are taken together, up
to ``max_batch_size`` rows and ``max_batch_tokens`` tokens, into one ONNX Runtime run; with
``max_queue_delay_us`` > 0 the scheduler waits that long for a batch to fill (0, the default, never waits).

Generation (``text_input``): every active generation advances by one token per step, all of them in one decode
run (a prefill runs on its own first), so no generation holds the model for its whole life. A generation whose
client does not read its tokens is paused (it keeps its cache, it is not computed) until the client reads again.

A request whose client cancelled, or whose deadline passed, is dropped from the queue or leaves its generation
within one step. Runs happen on ``instances`` threads, never on the event loop, so health checks and metadata
answer while the model computes. The scheduler lives on one asyncio event loop; only its runs leave it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ponder.errors import UnavailableError
from ponder.generation import Generation, SamplingParams, Token, text_bytes
from ponder.serve.engine import Engine, InferResult

BUFFERED_TOKENS = 4  # a generation whose client has this many tokens unread is paused


class QueueFullError(UnavailableError):
    """The model's queue holds ``max_queue`` requests already (RESOURCE_EXHAUSTED)."""


class DeadlineError(Exception):
    """The request's deadline passed before it was computed (DEADLINE_EXCEEDED)."""


@dataclass(frozen=True)
class BatchSettings:
    """How a model's scheduler batches and how much it holds. The command's flags are the defaults; a model's
    ``config.json`` may set its own (Triton's names): ``max_batch_size`` and ``dynamic_batching`` with
    ``max_queue_delay_microseconds`` and ``max_queue_size``."""

    max_batch_size: int = 32
    max_queue_delay_us: int = 0
    max_queue: int = 64
    max_batch_tokens: int = 16384

    def for_model(self, config: dict[str, Any]) -> BatchSettings:
        """These settings with a model's ``config.json`` overrides; a bad value is a ValueError naming it."""
        dynamic = config.get("dynamic_batching") or {}
        if not isinstance(dynamic, dict):
            raise ValueError(f"config.json: dynamic_batching must be an object, got {dynamic!r}")
        values = {"max_batch_size": config.get("max_batch_size", self.max_batch_size),
                  "max_queue_delay_us": dynamic.get("max_queue_delay_microseconds", self.max_queue_delay_us),
                  "max_queue": dynamic.get("max_queue_size", self.max_queue),
                  "max_batch_tokens": config.get("max_batch_tokens", self.max_batch_tokens)}
        for key, value in values.items():
            low = 0 if key in ("max_queue_delay_us", "max_queue") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"config.json: {key} must be a whole number >= {low}, got {value!r}")
        return BatchSettings(**values)


@dataclass(eq=False)
class Scored:
    """What a scoring request gets back: its own result, how long it waited, and the run it shared."""

    result: InferResult
    queue_s: float
    batch_size: int  # rows in the shared run
    batch_layers: int  # layers the shared run executed


@dataclass(eq=False)
class _Pending:
    ids: np.ndarray
    threshold: float
    key: tuple[Any, ...]
    future: asyncio.Future
    deadline: float | None  # loop time
    enqueued: float = field(default_factory=time.perf_counter)


class Stream:
    """One generation: its tokens arrive through :meth:`tokens`; leaving the iteration early leaves the
    generation (its cache is dropped at the next step)."""

    def __init__(self, scheduler: Scheduler, state: Generation, threshold: float, deadline: float | None) -> None:
        self.scheduler, self.state, self.threshold, self.deadline = scheduler, state, threshold, deadline
        self.out: asyncio.Queue[Token | BaseException] = asyncio.Queue()
        self.enqueued = time.perf_counter()
        self.queue_s = 0.0
        self.left = False

    async def tokens(self) -> AsyncIterator[Token]:
        try:
            while True:
                item = await self.out.get()
                self.scheduler.wake()  # a paused generation may go on
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.final:
                    return
        finally:
            self.left = True  # done, cancelled, or the caller stopped reading: the scheduler drops it
            self.scheduler.wake()

    @property
    def paused(self) -> bool:
        return self.out.qsize() >= BUFFERED_TOKENS


class Scheduler:
    def __init__(self, engine: Engine, settings: BatchSettings, executor: ThreadPoolExecutor, instances: int,
                 on_execution: Callable[[int], None] = lambda rows: None) -> None:
        self.engine, self.settings, self.executor = engine, settings, executor
        self.on_execution = on_execution  # called with the rows of every model run (statistics)
        self._instances = asyncio.Semaphore(instances)
        self._queue: deque[_Pending] = deque()
        self._waiting: deque[Stream] = deque()  # generations not yet started
        self._active: list[Stream] = []
        self._score_wake, self._generation_wake = asyncio.Event(), asyncio.Event()
        self._closed: BaseException | None = None
        self._tasks = [asyncio.ensure_future(self._score_loop()), asyncio.ensure_future(self._generation_loop())]
        self._running = 0  # runs in flight

    # -- what the front ends call ------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Requests waiting in the queue (scoring and generations not yet started)."""
        return sum(not p.future.done() for p in self._queue) + sum(not s.left for s in self._waiting)

    @property
    def busy(self) -> bool:
        return bool(self._queue or self._waiting or self._active or self._running)

    def wake(self) -> None:
        self._score_wake.set()
        self._generation_wake.set()

    def _admit(self) -> None:
        if self._closed is not None:
            raise self._closed
        if self.pending >= self.settings.max_queue:
            raise QueueFullError(f"the queue of this model is full ({self.settings.max_queue} requests waiting; "
                                 f"--max-queue or the model's dynamic_batching.max_queue_size raises it): retry "
                                 f"later")

    async def score(self, ids: np.ndarray, threshold: float, deadline: float | None) -> Scored:
        """Score ``ids`` at ``threshold`` in a shared run; raises what the run raised, DeadlineError, or the
        closing error. Cancelling the caller removes the request from the queue."""
        self._admit()
        loop = asyncio.get_running_loop()
        pending = _Pending(ids, threshold, self.engine.batch_key(ids, threshold), loop.create_future(), deadline)
        if not self._queue and not self._instances.locked() and self.settings.max_queue_delay_us == 0:
            await self._instances.acquire()  # free, so at once: nothing to batch with, run it now
            asyncio.ensure_future(self._run_scoring([pending]))
        else:
            self._queue.append(pending)
            self.wake()
        try:
            return await pending.future
        finally:
            if not pending.future.done():
                pending.future.cancel()  # the caller left: the loop skips it

    def generate(self, prompt: list[int], params: SamplingParams, threshold: float,
                 deadline: float | None) -> Stream:
        """Start a generation (it waits for room among the ``max_batch_size`` active ones)."""
        self._admit()
        state = Generation(prompt, params, self.engine.max_seq_len, text_bytes(self.engine.tokenizer))
        stream = Stream(self, state, threshold, deadline)
        self._waiting.append(stream)
        self.wake()
        return stream

    def close(self, error: BaseException) -> None:
        """Refuse new requests with ``error`` and end the waiting and running ones with it (their clients get it
        at once; a run in flight finishes, its results are dropped)."""
        self._closed = error
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(error)
        for stream in [*self._waiting, *self._active]:
            stream.out.put_nowait(error)
        self._waiting.clear()
        self._active.clear()
        for task in self._tasks:
            task.cancel()

    # -- scoring -----------------------------------------------------------------------------------------------
    async def _score_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_abandoned(loop.time())
            if not self._queue:
                self._score_wake.clear()
                await self._score_wake.wait()
                continue
            await self._instances.acquire()
            try:
                await self._fill(loop)
                batch = self._take(loop.time())
            except BaseException:
                self._instances.release()
                raise
            if not batch:
                self._instances.release()
                continue
            asyncio.ensure_future(self._run_scoring(batch))

    def _drop_abandoned(self, now: float) -> None:
        if not any(p.future.done() or (p.deadline is not None and p.deadline <= now) for p in self._queue):
            return
        kept: deque[_Pending] = deque()
        for p in self._queue:
            if p.future.done():
                continue
            if p.deadline is not None and p.deadline <= now:
                p.future.set_exception(DeadlineError("the deadline passed while the request waited in the queue; "
                                                     "it was not computed"))
                continue
            kept.append(p)
        self._queue = kept

    async def _fill(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait up to ``max_queue_delay_us`` after the oldest request for its batch to fill."""
        delay = self.settings.max_queue_delay_us / 1e6
        if delay <= 0 or not self._queue:
            return
        end = loop.time() + max(0.0, delay - (time.perf_counter() - self._queue[0].enqueued))
        while self._rows_like(self._queue[0]) < self.settings.max_batch_size and loop.time() < end:
            self._score_wake.clear()
            try:
                await asyncio.wait_for(self._score_wake.wait(), end - loop.time())
            except TimeoutError:
                break
            self._drop_abandoned(loop.time())
            if not self._queue:
                return

    def _rows_like(self, first: _Pending) -> int:
        return sum(len(p.ids) for p in self._queue if p.key == first.key)

    def _take(self, now: float) -> list[_Pending]:
        """The oldest live request and those after it that may share its run, within the batch limits."""
        self._drop_abandoned(now)
        if not self._queue:
            return []
        first = self._queue[0]
        batch, rows, longest, kept = [], 0, 0, deque()
        for p in self._queue:
            size, length = p.ids.shape
            # rows are padded to the longest: that is what the run holds
            fits = rows + size <= self.settings.max_batch_size and \
                (rows + size) * max(longest, length) <= self.settings.max_batch_tokens
            if p is first or (p.key == first.key and fits):
                batch.append(p)
                rows, longest = rows + size, max(longest, length)
            else:
                kept.append(p)
        self._queue = kept
        return batch

    async def _run_scoring(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        self._running += 1
        started = time.perf_counter()
        try:
            results, layers = await loop.run_in_executor(
                self.executor, self.engine.infer_rows, [(p.ids, p.threshold) for p in batch])
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        else:
            rows = sum(len(p.ids) for p in batch)
            self.on_execution(rows)
            for p, result in zip(batch, results, strict=True):
                if not p.future.done():
                    p.future.set_result(Scored(result, started - p.enqueued, rows, layers))
        finally:
            self._running -= 1
            self._instances.release()
            self.wake()

    # -- generation --------------------------------------------------------------------------------------------
    async def _generation_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            self._active = [s for s in self._active if self._still_wanted(s, now)]
            self._waiting = deque(s for s in self._waiting if self._still_wanted(s, now))
            while self._waiting and len(self._active) < self.settings.max_batch_size:
                stream = self._waiting.popleft()
                stream.queue_s = time.perf_counter() - stream.enqueued
                self._active.append(stream)
            runnable = [s for s in self._active if not s.paused]
            if not runnable:
                self._generation_wake.clear()
                await self._generation_wake.wait()
                continue
            async with self._instances:
                self._running += 1
                try:
                    steps = await loop.run_in_executor(
                        self.executor, self.engine.decode_rows,
                        [(s.state.feed, s.state.past, s.threshold) for s in runnable])
                except Exception as exc:
                    for s in runnable:
                        s.out.put_nowait(exc)
                        s.left = True
                    continue
                finally:
                    self._running -= 1
            self.on_execution(len(runnable))
            for stream, step in zip(runnable, steps, strict=True):
                if stream.left:
                    continue
                token = stream.state.advance(step)
                stream.out.put_nowait(token)
                if token.final:
                    stream.left = True

    @staticmethod
    def _still_wanted(stream: Stream, now: float) -> bool:
        if stream.left:
            return False
        if stream.deadline is not None and stream.deadline <= now:
            stream.out.put_nowait(DeadlineError("the deadline passed during the generation; it was stopped"))
            stream.left = True
            return False
        return True
