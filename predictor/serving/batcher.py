"""Micro-batching: concurrent calls merged into one call on a single worker thread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class MicroBatcher:
    """Merges concurrent calls into one ``run(items, choice)`` on a single worker thread.

    When the worker is idle a call starts at once (after ``max_wait`` if set, to collect company); while
    it is busy, calls queue and the next batch takes up to ``max_batch`` of them. So a lone request pays no
    added latency and a burst is served in a few large, efficient batches. ``choose(batch, waiting,
    head_wait_s)``, if given, is called on the event loop as each batch starts, with the batch's items, the
    items still queued behind it and how long the oldest item of the batch has waited; what it returns is
    ``run``'s second argument (the quality-ladder level).
    """

    def __init__(
        self,
        run: Callable[[list, object], list],
        max_batch: int,
        max_wait: float,
        choose: Callable[[list, list, float], object] | None = None,
    ):
        self.run, self.max_batch, self.max_wait, self.choose = run, max_batch, max_wait, choose
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recsys-model")
        self._pending: list[tuple[list, asyncio.Future, float]] = []
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, items: list) -> list:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((items, future, time.perf_counter()))
        if not self._busy:
            if self.max_wait > 0 and sum(len(i) for i, _, _ in self._pending) < self.max_batch:
                if self._timer is None:
                    self._timer = loop.call_later(self.max_wait, self._start)
            else:
                self._start()
        return await future

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy or not self._pending:
            return
        batch, size = [], 0
        while self._pending and (not batch or size + len(self._pending[0][0]) <= self.max_batch):
            entry = self._pending.pop(0)
            batch.append(entry)
            size += len(entry[0])
        choice = None
        if self.choose is not None:
            head_wait = time.perf_counter() - batch[0][2]
            choice = self.choose(
                [i for items, _, _ in batch for i in items],
                [i for items, _, _ in self._pending for i in items],
                head_wait,
            )
        self._busy = True
        asyncio.get_running_loop().create_task(self._run(batch, choice))

    async def _run(self, batch: list[tuple[list, asyncio.Future, float]], choice) -> None:
        flat = [item for items, _, _ in batch for item in items]
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.run, flat, choice)
            at = 0
            for items, future, _ in batch:
                if not future.done():
                    future.set_result(results[at : at + len(items)])
                at += len(items)
        except Exception as exc:  # noqa: BLE001 - every waiter learns of the failure
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            self._busy = False
            if self._pending:
                self._start()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
