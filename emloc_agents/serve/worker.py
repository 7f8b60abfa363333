"""One thread runs everything that touches the model (generation, compression): the model and its
prompt cache are not thread-safe. Requests wait in a bounded queue; past it they are refused at once
(503) rather than piling up behind a slow one. Chat requests that wait together are answered together
(``ChatBatcher``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import APIError

if TYPE_CHECKING:
    from langchain_core.messages import AIMessageChunk, BaseMessage

    from ..chat_model import EMLoCChatModel

T = TypeVar("T")
_DONE = object()


class Overloaded(APIError):
    """The queue of waiting requests is full."""

    def __init__(self, max_queue: int) -> None:
        super().__init__(503, f"the server is busy ({max_queue} requests already waiting); retry shortly",
                         code="overloaded", headers={"Retry-After": "1"})


class ModelWorker:
    """A single-thread executor with admission control: one job runs (a compression, or a batch of
    requests) and at most ``max_queue`` requests wait; past that a request is refused at once."""

    def __init__(self, max_queue: int = 16) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emloc-model")
        self._admitted = 0  # running + waiting
        self._running = 0  # requests the running job is answering
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Requests running or waiting."""
        return self._admitted

    def admit(self) -> None:
        """Count one more request in, or refuse it with ``Overloaded`` now when ``max_queue`` wait
        already (while nothing runs yet, one more: the next to run)."""
        with self._lock:
            if self._admitted - self._running >= self.max_queue + (self._running == 0):
                raise Overloaded(self.max_queue)
            self._admitted += 1

    def start(self, n: int = 1) -> None:
        """``n`` admitted requests stop waiting: the job now running answers them."""
        with self._lock:
            self._running += n

    def leave(self, running: bool = True) -> None:
        """A request admitted with ``admit`` is done (``running``: after ``start``)."""
        with self._lock:
            self._admitted -= 1
            self._running -= running

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``fn()`` queued on the model thread now (admitted, or refused with ``Overloaded``, now);
        called on the event loop."""
        self.admit()

        def job() -> T:
            self.start()
            try:
                return fn()
            finally:
                self.leave()

        try:
            return asyncio.get_running_loop().run_in_executor(self._executor, job)
        except BaseException:
            self.leave(running=False)
            raise

    def schedule(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """``fn()`` queued on the model thread, with no admission of its own (it serves requests that
        were admitted); from any thread."""
        return self._executor.submit(fn)

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the model thread, awaited."""
        return await self.submit(fn)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Call:
    """One chat request waiting for, or being answered on, the model thread."""

    messages: list[BaseMessage]
    options: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item: Any) -> None:
        """Hand an item to the reader on the event loop (never blocks the model thread)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class ChatBatcher:
    """Chat requests answered on the model thread, those that wait together answered together.

    A request joins the waiting list; the first to find it empty queues a job on the model thread.
    That job takes every request waiting by then (up to ``max_batch``) and answers them with
    ``EMLoCChatModel.stream_together``: requests on one skill decode as one batch, so while the model
    is busy the next requests gather and their batch costs little more than one of them. Chunks reach
    each reader as they come; a reader that leaves drops its request from the batch. ``max_batch=1``
    answers one request at a time."""

    def __init__(self, worker: ModelWorker, chat: EMLoCChatModel, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.worker, self.chat, self.max_batch = worker, chat, max_batch
        self._waiting: list[_Call] = []
        self._lock = threading.Lock()
        self.batches = 0  # jobs that answered requests (for /health and the serving bench)
        self.batched_requests = 0  # requests they answered
        self.largest_batch = 0

    def stream(self, messages: list[BaseMessage], options: dict[str, Any]) -> AsyncIterator[AIMessageChunk]:
        """The reply's chunks; called on the event loop. The request is admitted now (an overloaded
        server refuses it before a response starts)."""
        self.worker.admit()
        call = _Call(messages, options, asyncio.get_running_loop())
        with self._lock:
            self._waiting.append(call)
            first = len(self._waiting) == 1
        if first and (error := self._schedule()) is not None:
            raise error
        return drain(call.queue, call.cancelled)

    def _schedule(self) -> BaseException | None:
        """Queue a job for the waiting requests; where the model thread is shut down, they get the
        error instead (returned too)."""
        try:
            self.worker.schedule(self._answer_waiting)
            return None
        except BaseException as e:  # noqa: BLE001 - nobody will answer them: each reader gets the error
            with self._lock:
                calls, self._waiting = self._waiting, []
            for call in calls:
                call.put(e)
                self._done(call, running=False)
            return e

    def _answer_waiting(self) -> None:
        """On the model thread: answer the requests waiting now, together."""
        with self._lock:
            calls, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            more = bool(self._waiting)
        if more:  # the rest go in the next job, queued behind this one
            self._schedule()
        live = [c for c in calls if not c.cancelled.is_set()]
        for call in calls:
            if call.cancelled.is_set():
                self._done(call, running=False)
        if not live:
            return
        self.worker.start(len(live))
        self.batches += 1
        self.batched_requests += len(live)
        self.largest_batch = max(self.largest_batch, len(live))
        try:
            streams = self.chat.stream_together([c.messages for c in live], [c.options for c in live])
        except BaseException as e:  # noqa: BLE001 - every reader gets the error
            for call in live:
                call.put(e)
                self._done(call)
            return
        running = list(zip(live, streams, strict=True))
        while running:  # one chunk per reply in turn: each reply's chunks are sent as they come
            still = []
            for call, chunks in running:
                if call.cancelled.is_set():
                    chunks.close()  # type: ignore[attr-defined]  # a generator: leaves the batch
                    self._done(call)
                    continue
                try:
                    call.put(next(chunks))
                    still.append((call, chunks))
                except StopIteration:
                    self._done(call)
                except BaseException as e:  # noqa: BLE001 - handed to this reply's reader
                    call.put(e)
                    self._done(call)
            running = still

    def _done(self, call: _Call, running: bool = True) -> None:
        self.worker.leave(running)
        call.put(_DONE)


async def drain(queue: asyncio.Queue[Any], cancelled: threading.Event) -> AsyncIterator[Any]:
    """Items from the model thread until the end mark; an exception is raised in the reader. Closing
    the iterator early sets ``cancelled`` (the model thread stops at its next item)."""
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
