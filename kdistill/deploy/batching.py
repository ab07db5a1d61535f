"""Micro-batching for the server: images of concurrent requests share one model call.

One asyncio task takes the oldest waiting image, waits at most ``max_wait_ms`` for more
(up to ``max_batch``), runs the model on the stacked batch in a worker thread and hands
each request its rows. The queue is bounded: when ``queue_size`` images already wait, a
new request is refused at once (:class:`QueueFull`, answered 503) rather than queued
without end. ``max_batch=1`` turns batching off (each request is run on its own, with at
most ``queue_size`` requests in flight).
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable

import numpy as np


class QueueFull(Exception):
    """Too many images waiting: the server is over capacity (HTTP 503)."""


class MicroBatcher:
    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int = 8,
                 max_wait_ms: float = 5.0, queue_size: int = 256,
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or max_wait_ms < 0 or queue_size < 1:
            raise ValueError("max_batch >= 1, max_wait_ms >= 0 and queue_size >= 1 are required")
        self.infer = infer
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.queue_size = queue_size
        self.on_batch = on_batch
        self.pending: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self.in_flight = 0  # unbatched mode: requests being run
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        return self.max_batch > 1

    def depth(self) -> int:
        return len(self.pending) if self.enabled else self.in_flight

    async def start(self) -> None:
        if self.enabled and self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self.pending:
            _, fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(QueueFull("server shutting down"))

    async def submit(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Model outputs (one row per image) for ``images`` of one request."""
        loop = asyncio.get_running_loop()
        if not self.enabled:
            if self.in_flight >= self.queue_size:
                raise QueueFull(f"{self.in_flight} requests in flight")
            self.in_flight += 1
            try:
                out = await loop.run_in_executor(None, self.infer, np.stack(images))
            finally:
                self.in_flight -= 1
            if self.on_batch:
                self.on_batch(len(images))
            return list(out)
        if len(self.pending) + len(images) > self.queue_size:
            raise QueueFull(f"{len(self.pending)} images waiting (queue size {self.queue_size})")
        futures = [loop.create_future() for _ in images]
        self.pending.extend(zip(images, futures))
        assert self._wakeup is not None, "MicroBatcher.start() was not awaited"
        self._wakeup.set()
        return list(await asyncio.gather(*futures))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            while not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = loop.time() + self.max_wait
            while len(self.pending) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            take = [self.pending.popleft() for _ in range(min(self.max_batch, len(self.pending)))]
            live = [(x, f) for x, f in take if not f.done()]  # skip requests already gone
            if not live:
                continue
            try:
                out = await loop.run_in_executor(None, self.infer, np.stack([x for x, _ in live]))
            except Exception as err:  # noqa: BLE001 - fail these requests, keep serving
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            if self.on_batch:
                self.on_batch(len(live))
            for (_, fut), row in zip(live, out):
                if not fut.done():
                    fut.set_result(row)
