"""Dynamic micro-batching: concurrent requests share one ``Predictor.score`` call.

Every model call runs in :class:`ModelWorker`'s single thread (the model is not re-entrant, and the
event loop must never block on it). :class:`MicroBatcher` gathers queued images until ``max_batch``,
waiting at most ``max_wait_ms`` after the first, and only while other admitted requests are still
being read and decoded. While the model runs, new requests queue up and form the next batch, so a
busy server batches and a lone request is answered at once.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger(__name__)


class ModelWorker:
    """The one thread that touches the model."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cervl-model")

    def submit(self, fn, *args, **kwargs):
        return self.pool.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class SerialPredictor:
    """A predictor facade for other threads (video jobs): every ``score`` goes through the model thread."""

    def __init__(self, predictor, worker: ModelWorker, metrics=None):
        self.predictor, self.worker, self.metrics = predictor, worker, metrics
        self.label_set, self.style = predictor.label_set, predictor.style

    def score(self, images: list, *, batch_size: int = 16, normalize: str = "sum") -> np.ndarray:
        if self.metrics is not None:
            self.metrics.batch_size(len(images))
        return self.worker.submit(self.predictor.score, images, batch_size=batch_size, normalize=normalize).result()


class PixelBudget:
    """A server-wide budget of decoded image pixels in flight, so that concurrent requests cannot exhaust memory.

    A request holds its images' pixels (read from the headers, before any decoding) from decoding until
    its answer. Requests that do not fit wait, at most ``wait_s``; then they get a 503 (``BudgetBusy``).
    """

    class Busy(Exception):
        pass

    def __init__(self, total: int, wait_s: float = 10.0):
        self.total, self.wait_s, self.used = total, wait_s, 0
        self._cond: asyncio.Condition | None = None

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:  # created inside the event loop that uses it
            self._cond = asyncio.Condition()
        return self._cond

    async def acquire(self, pixels: int) -> int:
        """Take ``pixels`` (at most the whole budget); raises :class:`PixelBudget.Busy` after ``wait_s``."""
        pixels = min(pixels, self.total)
        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(lambda: self.used + pixels <= self.total), self.wait_s)
            except asyncio.TimeoutError:
                raise PixelBudget.Busy(f"{self.used} of {self.total} pixels are being decoded or scored") from None
            self.used += pixels
        return pixels

    async def release(self, pixels: int) -> None:
        async with self.cond:
            self.used -= pixels
            self.cond.notify_all()


class MicroBatcher:
    """``await batcher.score(image)`` -> class probabilities, computed in a shared batch."""

    def __init__(self, predictor, worker: ModelWorker, *, max_batch: int = 32, max_wait_ms: float = 10.0,
                 metrics=None):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.predictor, self.worker, self.metrics = predictor, worker, metrics
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.arriving = 0  # requests admitted but still being read/decoded: worth waiting for

    def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=8 * self.max_batch)  # bounded: a full queue makes producers wait
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def score(self, image) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future

    async def _gather(self) -> list:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0 or self.arriving <= 0:  # nobody else is on the way: a lone request never waits
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [(im, fut) for im, fut in batch if not fut.cancelled()]  # timed-out requests are dropped

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            images = [im for im, _ in batch]
            if self.metrics is not None:
                self.metrics.batch_size(len(images))
            try:
                probs = await asyncio.wrap_future(
                    self.worker.submit(self.predictor.score, images, batch_size=len(images)), loop=loop)
            except Exception as e:  # a model fault fails this batch's requests, not the server
                log.exception("model call failed for a batch of %d", len(images))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), p in zip(batch, probs):
                if not fut.done():
                    fut.set_result(p)
