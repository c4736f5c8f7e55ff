"""Opportunistic batching across sessions for one (model, cut).

Requests from many devices for the same tail are queued. A batch is dispatched **at once**
when the tail worker is idle, holding whatever has queued (up to ``max_batch``): a lone
device never waits for company. While the worker runs a batch, new requests queue, and the
next batch takes all of them as soon as the worker is free again; under load batches grow
by themselves, with no timer. ``max_wait`` is only an upper limit, for batchers that share
a worker with others: a batch that has waited that long for the worker (or is full) joins
the worker's queue instead of waiting for it to go idle. The queue is bounded: when it is
full, :meth:`Batcher.submit` refuses at once (back-pressure) instead of letting a flood grow
memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from secure_ci.exceptions import ConfigError, ProtocolError

__all__ = ["BUSY_CODE", "BatchLimits", "Batcher", "TailWorker"]

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")
T = TypeVar("T")

BUSY_CODE = 8  # ErrorCode.BUSY of the wire protocol
INTERNAL_CODE = 10  # ErrorCode.INTERNAL
SHUTTING_DOWN_CODE = 12  # ErrorCode.SHUTTING_DOWN


@dataclass(frozen=True)
class BatchLimits:
    """How large a batch may grow, how long it may wait for a busy worker, how many queue."""

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


class TailWorker:
    """Where batches run (``executor``, None: the loop's default), and whether it is busy.

    Batchers that share a worker see each other's batches: they dispatch at once only when
    nothing runs or waits in it. Create it inside the running loop.
    """

    def __init__(self, executor: Executor | None = None) -> None:
        self._executor = executor
        self._busy = 0
        self._listeners: set[asyncio.Event] = set()

    @property
    def idle(self) -> bool:
        """True when no batch runs or waits in the worker."""
        return self._busy == 0

    async def run(self, fn: Callable[[T], Out], arg: T) -> Out:
        """``fn(arg)`` in the worker; batchers waiting for an idle worker wake when it is."""
        self._busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, arg)
        finally:
            self._busy -= 1
            if not self._busy:
                for event in self._listeners:
                    event.set()

    def listen(self, event: asyncio.Event) -> None:
        """Set ``event`` whenever the worker goes idle."""
        self._listeners.add(event)

    def forget(self, event: asyncio.Event) -> None:
        self._listeners.discard(event)


@dataclass
class _Pending(Generic[In, Out]):
    item: In
    future: asyncio.Future[Out]


class Batcher(Generic[In, Out]):
    """Batch ``submit``-ted items through ``run_batch`` (called in the ``worker``).

    ``run_batch`` maps a sequence of items to a sequence of outputs of the same length; it runs
    in a worker thread. Pass a shared :class:`TailWorker` (or an ``executor`` for a worker of
    one's own). ``clock`` (seconds, default the loop's) times ``max_wait``. Use as an async
    context manager: leaving it drains the queue.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[In]], Sequence[Out]],
        *,
        limits: BatchLimits,
        executor: Executor | None = None,
        worker: TailWorker | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if worker is not None and executor is not None:
            raise ConfigError("pass a worker or an executor, not both")
        self._run_batch = run_batch
        self._limits = limits
        self._executor = executor
        self._worker = worker
        self._clock = clock
        self._waiting: deque[_Pending[In, Out]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches_run = 0
        self.items_run = 0

    async def __aenter__(self) -> Batcher[In, Out]:
        if self._worker is None:
            self._worker = TailWorker(self._executor)
        if self._clock is None:
            self._clock = asyncio.get_running_loop().time
        self._worker.listen(self._wake)
        self._task = asyncio.create_task(self._collect_forever())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.drain()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def submit(self, item: In) -> Out:
        """Queue ``item`` and wait for its output; refuses with code BUSY when the queue is full."""
        if self._closing or self._task is None:
            raise ProtocolError("the edge is shutting down", code=SHUTTING_DOWN_CODE)
        if len(self._waiting) >= self._limits.max_queue:
            raise ProtocolError("batch queue is full, retry later", code=BUSY_CODE)
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Pending(item, future))
        self._wake.set()
        return await future

    async def drain(self) -> None:
        """Stop accepting, finish everything queued, then stop the collector."""
        self._closing = True
        if self._task is None:
            return
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._worker is not None:
            self._worker.forget(self._wake)

    async def _collect_forever(self) -> None:
        while True:
            while not self._waiting:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            await self._run(await self._collect())

    async def _collect(self) -> list[_Pending[In, Out]]:
        """Take what queued; dispatch at once if the worker is idle, else wait for it (for
        more items meanwhile) until the batch is full or has waited ``max_wait``."""
        if self._worker is None or self._clock is None:  # pragma: no cover - set in __aenter__
            raise RuntimeError("the batcher is not running")
        limit = self._limits.max_batch
        batch: list[_Pending[In, Out]] = []
        opened = self._clock()
        while True:
            while self._waiting and len(batch) < limit:
                batch.append(self._waiting.popleft())
            remaining = opened + self._limits.max_wait - self._clock()
            if len(batch) >= limit or self._worker.idle or remaining <= 0 or self._closing:
                return batch
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wake.wait()

    async def _run(self, batch: list[_Pending[In, Out]]) -> None:
        live = [p for p in batch if not p.future.done()]
        if not live or self._worker is None:
            return
        items = [p.item for p in live]
        try:
            outputs = await self._worker.run(self._run_batch, items)
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
