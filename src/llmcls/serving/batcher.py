"""Dynamic batching, framework-free: rows from concurrent requests share forward passes (used by the HTTP app,
and driven directly by ``benchmarks/serve_load.py``).

Requests do not run the model themselves. Each text is first shortened to the run's ``max_length`` on a small
pool of preparation threads (tokenising a 3,000-character text takes milliseconds of CPU that would otherwise
stall the GPU), then queued as one row. One model thread takes rows off the queue — waiting at most
``max_wait_ms`` for company once the first row is there (longer, up to ``PREP_WAIT_FACTOR`` times, while rows are
known to be in preparation), never more than ``max_batch`` rows — scores them in one call, and hands the results
back to the event loop. Under load a forward pass serves many requests at once; alone, a request waits only
``max_wait_ms``. The event loop never runs the model, so the app answers /health while a batch runs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from llmcls.data import Row

log = logging.getLogger(__name__)

PREP_WAIT_FACTOR = 10


class Overloaded(RuntimeError):
    """The queue holds ``max_queue_rows`` rows already; the client should retry later."""


@dataclass
class _Item:
    payload: Any            # a row, or what ``prepare`` made of it
    future: asyncio.Future


class Batcher:
    """Dynamic batching: rows from concurrent requests share forward passes.

    ``prepare`` (optional) turns a request's rows into items, on a pool of ``prepare_threads`` threads; ``score``
    maps a list of items (rows, without ``prepare``) to one result each, one batch at a time, on the batcher's own
    model thread. That thread takes its next batch straight off the queue the moment a pass ends: it never waits
    for the event loop, which under load is busy parsing requests and writing responses (a batcher living on the
    event loop left the GPU idle for that long between passes). Results go back to the loop with
    ``call_soon_threadsafe``. A batch that fails is retried item by item, so one bad row fails its own request
    and no other."""

    def __init__(self, score: Callable[[Sequence[Any]], list], max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue_rows: int = 4096, prepare: Optional[Callable[[Sequence[Row]], list]] = None,
                 prepare_threads: int = 4):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.score = score
        self.prepare = prepare
        self.prepare_threads = max(1, prepare_threads)
        self._prep_pool: Optional[ThreadPoolExecutor] = None
        self._preparing = 0  # rows between submit() and the queue
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_ms) / 1000
        self.max_queue_rows = max_queue_rows
        self._items: collections.deque[_Item] = collections.deque()
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.stats = {"batches": 0, "rows": 0, "failed_batches": 0, "batch_sizes": collections.Counter(),
                      "busy_s": 0.0}

    @property
    def queued(self) -> int:
        return len(self._items)

    def start(self) -> None:
        """Start the model thread (idempotent); call from the event loop that will submit."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        if self.prepare is not None and self._prep_pool is None:
            self._prep_pool = ThreadPoolExecutor(max_workers=self.prepare_threads, thread_name_prefix="llmcls-prep")
        self._thread = threading.Thread(target=self._work, name="llmcls-model", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        while self._items:
            item = self._items.popleft()
            if not item.future.done():
                item.future.cancel()
        if self._prep_pool is not None:
            self._prep_pool.shutdown(wait=True)
            self._prep_pool = None

    async def submit(self, rows: Sequence[Row]) -> list:
        """Queue the rows and wait for their results (in order). Raises :class:`Overloaded` when full, or the
        row's own exception (e.g. :class:`PromptTooLong`)."""
        self.start()
        if len(self._items) + len(rows) > self.max_queue_rows:
            raise Overloaded(f"{len(self._items)} rows are queued; retry later")
        loop = asyncio.get_running_loop()
        if self.prepare is not None:
            n = len(rows)
            self._preparing += n
            try:
                rows = await loop.run_in_executor(self._prep_pool, self.prepare, rows)
            finally:
                with self._cond:  # a batch waiting on these rows re-checks at once
                    self._preparing -= n
                    self._cond.notify()
        items = [_Item(r, loop.create_future()) for r in rows]
        with self._cond:
            self._items.extend(items)
            self._cond.notify()
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            for i in items:  # the client went away: its rows are skipped if still queued
                if not i.future.done():
                    i.future.cancel()

    def _next_batch(self) -> Optional[list[_Item]]:
        """Block until there is a batch to run (None: stopping). A batch that is not full waits up to max_wait
        for company (under load the queue refills while the model runs, so full batches leave at once). Rows
        still being prepared (tokenised) are known to be milliseconds away: waiting for them, up to
        PREP_WAIT_FACTOR windows, costs less than a forward pass without them."""
        with self._cond:
            while not self._items and not self._stopping:
                self._cond.wait()
            now = time.monotonic()
            deadline, hard = now + self.max_wait, now + self.max_wait * PREP_WAIT_FACTOR
            while len(self._items) < self.max_batch and not self._stopping:
                remaining = (hard if self._preparing else deadline) - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._stopping:
                return None
            batch = []
            while self._items and len(batch) < self.max_batch:
                item = self._items.popleft()
                if not item.future.done():  # skipped: its request was cancelled
                    batch.append(item)
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            t0 = time.perf_counter()
            results = self._score_isolating([i.payload for i in batch])
            self.stats["busy_s"] += time.perf_counter() - t0
            self.stats["batches"] += 1
            self.stats["rows"] += len(batch)
            self.stats["batch_sizes"][len(batch)] += 1
            try:
                self._loop.call_soon_threadsafe(self._resolve, batch, results)
            except RuntimeError:  # the event loop is gone: nobody is waiting any more
                return

    @staticmethod
    def _resolve(batch: list[_Item], results: list) -> None:
        for item, res in zip(batch, results):
            if item.future.done():
                continue
            if isinstance(res, BaseException):
                item.future.set_exception(res)
            else:
                item.future.set_result(res)

    def _score_isolating(self, rows: list[Row]) -> list:
        try:
            return list(self.score(rows))
        except Exception as e:
            if len(rows) == 1:
                return [e]
            self.stats["failed_batches"] += 1
            log.warning("a batch of %d rows failed (%s: %s); scoring its rows one by one", len(rows),
                        type(e).__name__, e)
            out = []
            for r in rows:
                try:
                    out.extend(self.score([r]))
                except Exception as e1:
                    out.append(e1)
            return out

    def snapshot(self) -> dict:
        s = self.stats
        return {"max_batch": self.max_batch, "max_wait_ms": self.max_wait * 1000, "queued_rows": self.queued,
                "batches": s["batches"], "rows": s["rows"], "failed_batches": s["failed_batches"],
                "mean_batch": round(s["rows"] / s["batches"], 3) if s["batches"] else None,
                "largest_batch": max(s["batch_sizes"], default=0), "busy_s": round(s["busy_s"], 3)}
