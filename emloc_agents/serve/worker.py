"""One thread runs everything that touches the model (generation, compression): the model and its
prompt cache are not thread-safe. Requests wait in a bounded queue; past it they are refused at once
(503) rather than piling up behind a slow one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import APIError

T = TypeVar("T")
_DONE = object()


class Overloaded(APIError):
    """The queue of waiting requests is full."""

    def __init__(self, max_queue: int) -> None:
        super().__init__(503, f"the server is busy ({max_queue} requests already waiting); retry shortly",
                         code="overloaded", headers={"Retry-After": "1"})


class ModelWorker:
    """A single-thread executor with admission control: at most one job runs and ``max_queue`` wait."""

    def __init__(self, max_queue: int = 16) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emloc-model")
        self._admitted = 0  # running + waiting
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Jobs running or waiting."""
        return self._admitted

    def _admit(self) -> None:
        with self._lock:
            if self._admitted > self.max_queue:  # one running and max_queue waiting already
                raise Overloaded(self.max_queue)
            self._admitted += 1

    def _leave(self) -> None:
        with self._lock:
            self._admitted -= 1

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``fn()`` queued on the model thread now (admitted, or refused with ``Overloaded``, now);
        called on the event loop."""
        self._admit()

        def job() -> T:
            try:
                return fn()
            finally:
                self._leave()

        try:
            return asyncio.get_running_loop().run_in_executor(self._executor, job)
        except BaseException:
            self._leave()
            raise

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the model thread, awaited."""
        return await self.submit(fn)

    def stream(self, make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """Iterate ``make()`` on the model thread; items cross to the event loop through a queue that
        never blocks the worker (a slow reader does not hold the model). Called on the event loop: the
        job is admitted and queued now, so an overloaded server refuses before a response starts.
        Closing the returned iterator early stops the worker at its next item."""
        self._admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def job() -> None:
            try:
                if cancelled.is_set():
                    return
                for item in make():
                    put(item)
                    if cancelled.is_set():
                        break
            except BaseException as e:  # noqa: BLE001 - handed to the reader
                put(e)
            finally:
                self._leave()
                put(_DONE)

        try:
            loop.run_in_executor(self._executor, job)
        except BaseException:
            self._leave()
            raise
        return self._drain(queue, cancelled)

    @staticmethod
    async def _drain(queue: asyncio.Queue[Any], cancelled: threading.Event) -> AsyncIterator[Any]:
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

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
