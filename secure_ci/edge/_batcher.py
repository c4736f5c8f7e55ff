"""Dynamic batching across sessions for one (model, cut).

Requests from many devices for the same tail are queued; a collector takes the first waiting
request, then keeps collecting until ``max_batch`` items or ``max_wait`` seconds have passed,
and runs the whole batch once in a worker thread so the event loop stays responsive. While a
batch runs, the next one accumulates, which is what gives throughput under load. The queue is
bounded: when it is full, :meth:`Batcher.submit` refuses at once (back-pressure) instead of
letting a flood grow memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from secure_ci.exceptions import ConfigError, ProtocolError

__all__ = ["BUSY_CODE", "BatchLimits", "Batcher"]

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

BUSY_CODE = 8  # ErrorCode.BUSY of the wire protocol
INTERNAL_CODE = 10  # ErrorCode.INTERNAL
SHUTTING_DOWN_CODE = 12  # ErrorCode.SHUTTING_DOWN


@dataclass(frozen=True)
class BatchLimits:
    """How large a batch may grow, how long its first item may wait, how many may queue."""

    max_batch: int = 32
    max_wait: float = 0.002
    max_queue: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 4096:
            raise ConfigError(f"max_batch must be in 1..4096, not {self.max_batch}")
        if not 0.0 <= self.max_wait <= 10.0:
            raise ConfigError(f"max_wait must be in 0..10 s, not {self.max_wait}")
        if not self.max_batch <= self.max_queue <= 1 << 20:
            raise ConfigError(f"max_queue must be in max_batch..2^20, not {self.max_queue}")


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]


class Batcher(Generic[In, Out]):
    """Batch ``submit``-ted items through ``run_batch`` (called in ``executor``).

    ``run_batch`` maps a sequence of items to a sequence of outputs of the same length; it runs
    in a worker thread. Use as an async context manager: leaving it drains the queue.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[In]], Sequence[Out]],
        *,
        limits: BatchLimits,
        executor: Executor | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._limits = limits
        self._executor = executor
        self._queue: asyncio.Queue[_Pending[In, Out]] = asyncio.Queue(limits.max_queue)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches_run = 0
        self.items_run = 0

    async def __aenter__(self) -> Batcher[In, Out]:
        self._task = asyncio.create_task(self._collect_forever())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drain()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def submit(self, item: In) -> Out:
        """Queue ``item`` and wait for its output; refuses with code BUSY when the queue is full."""
        if self._closing or self._task is None:
            raise ProtocolError("the edge is shutting down", code=SHUTTING_DOWN_CODE)
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(item, future))
        except asyncio.QueueFull:
            raise ProtocolError("batch queue is full, retry later", code=BUSY_CODE) from None
        return await future

    async def drain(self) -> None:
        """Stop accepting, finish everything queued, then stop the collector."""
        self._closing = True
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._limits.max_wait
            while len(batch) < self._limits.max_batch:
                if self._queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            batch.append(await self._queue.get())
                    except TimeoutError:
                        break
                else:
                    batch.append(self._queue.get_nowait())
            try:
                await self._run(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _run(self, batch: list[_Pending[In, Out]]) -> None:
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        items = [p.item for p in live]
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._executor, self._run_batch, items)
            if len(outputs) != len(live):
                raise ProtocolError("tail returned a wrong number of outputs", code=INTERNAL_CODE)
        except Exception as exc:  # the tail failed: every waiter gets the error, loop lives on
            log.warning("batch of %d failed: %s", len(live), exc)
            error = (
                exc
                if isinstance(exc, ProtocolError)
                else ProtocolError(f"tail failed: {type(exc).__name__}", code=INTERNAL_CODE)
            )
            for p in live:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        self.batches_run += 1
        self.items_run += len(live)
        for p, out in zip(live, outputs, strict=True):
            if not p.future.done():
                p.future.set_result(out)
