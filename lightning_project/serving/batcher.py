"""A bounded asyncio micro-batcher: concurrent callers share one call of a batch function.

A forward pass over 16 images costs far less than 16 passes over one, so requests that arrive
close together are gathered: the first waits at most `timeout_s` for others (or until
`max_batch_size` are there), then the whole batch goes through `fn` at once. `fn` runs in ONE
worker thread, so the event loop stays free to accept requests and torch runs one batch at a
time (two concurrent forward passes would only fight over the same cores). While a batch runs,
new requests queue up and go together as soon as it ends. The waiting line is bounded: past
`max_queue` waiting items `submit` raises `Busy` at once, which a server turns into 503,
instead of memory growing until it dies.

Generic on purpose (items and results are whatever `fn` takes and gives): it knows nothing of
images, HTTP or torch, and is tested on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
log = logging.getLogger("lightning_project")


class Busy(Exception):
    """The queue is full: the caller should come back later (HTTP 503 + Retry-After)."""


class MicroBatcher(Generic[Item, Result]):
    """`await submit(item)` -> `fn([..., item, ...])[its index]`, batched with whatever else is waiting.

    Use inside a running event loop: `start()` before the first `submit`, `await stop()` at the end
    (a FastAPI lifespan does both). Counters (`requests`, `batches`, `largest_batch`, `rejected`)
    say how well batching works under the real load.
    """

    def __init__(self, fn: Callable[[list[Item]], list[Result]], max_batch_size: int = 32,
                 timeout_s: float = 0.005, max_queue: int = 256) -> None:
        if max_batch_size < 1 or max_queue < 1 or timeout_s < 0:
            raise ValueError(f"max_batch_size={max_batch_size} and max_queue={max_queue} must be >= 1, "
                             f"timeout_s={timeout_s} >= 0")
        self.fn, self.max_batch_size, self.timeout_s, self.max_queue = fn, max_batch_size, timeout_s, max_queue
        self.requests = self.batches = self.largest_batch = self.rejected = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._worker: ThreadPoolExecutor | None = None
        self._current: list[asyncio.Future] = []  # callers of the batch being gathered or computed

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start gathering batches on the running loop, with a fresh worker thread."""
        if self._task is not None:
            raise RuntimeError("MicroBatcher already started")
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-worker")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop gathering; callers still waiting get an error rather than hanging forever."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        waiting = [self._queue.get_nowait()[1] for _ in range(self._queue.qsize())]
        for future in [*self._current, *waiting]:
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))
        self._worker.shutdown(wait=False, cancel_futures=True)  # a batch still computing ends on its own
        self._task = self._worker = self._queue = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def waiting(self) -> int:
        """Items queued and not yet taken into a batch."""
        return self._queue.qsize() if self._queue is not None else 0

    def stats(self) -> dict:
        return {"requests": self.requests, "batches": self.batches, "largest_batch": self.largest_batch,
                "rejected": self.rejected, "waiting": self.waiting}

    # ---- callers ---------------------------------------------------------------------------------
    async def submit(self, item: Item) -> Result:
        """The result of `item`, computed in a batch; raises `Busy` at once when the queue is full,
        and whatever `fn` raised for the batch it was in."""
        if not self.running:  # never queue where nothing will take it
            raise RuntimeError("MicroBatcher not running: call start() inside the event loop first")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future, time.monotonic()))
        except asyncio.QueueFull:
            self.rejected += 1
            raise Busy(f"{self.max_queue} requests already waiting") from None
        return await future

    # ---- the gathering loop ----------------------------------------------------------------------
    async def _gather(self) -> list[tuple[Item, asyncio.Future]]:
        """The next batch: the oldest waiting item and whatever else comes before its deadline.

        The deadline counts from when the first item was queued, not from now: an item that already
        waited through the previous batch does not wait again for company.
        """
        item, future, queued_at = await self._queue.get()
        batch = [(item, future)]
        self._current = [future]  # from here on, stop() answers these callers
        deadline = queued_at + self.timeout_s
        while len(batch) < self.max_batch_size:
            try:
                item, future, _ = self._queue.get_nowait()  # already there: no waiting
            except asyncio.QueueEmpty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item, future, _ = await asyncio.wait_for(self._queue.get(), left)
                except asyncio.TimeoutError:
                    break
            batch.append((item, future))
            self._current.append(future)
        # a caller that went away (client disconnected, cancelled) needs no computing
        return [(i, f) for i, f in batch if not f.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self._worker, self.fn, items)
                if len(results) != len(items):
                    raise RuntimeError(f"batch function gave {len(results)} results for {len(items)} items")
            except Exception as e:  # the batch's callers all get the error; the loop goes on serving
                log.exception("batch of %d failed", len(items))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.batches += 1
            self.requests += len(items)
            self.largest_batch = max(self.largest_batch, len(items))
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
