"""Opportunistic batching: grouping, ordering, back-pressure, failures, drain, shared workers.

The scheduling tests run batches in a :class:`StepExecutor` the test releases by hand and
freeze the batcher's clock, so what they check is order and grouping, never elapsed time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from typing import Any

import pytest

from secure_ci.edge import Batcher, BatchLimits, TailWorker
from secure_ci.exceptions import ConfigError, ProtocolError


async def test_concurrent_submissions_are_batched_and_answered_in_order() -> None:
    sizes: list[int] = []
    threads: set[int] = set()

    def double(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        threads.add(threading.get_ident())
        return [2 * i for i in items]

    async with Batcher(double, limits=BatchLimits(max_batch=8, max_wait=0.05)) as batcher:
        outputs = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
    assert outputs == [2 * i for i in range(20)]
    assert sum(sizes) == 20
    assert max(sizes) == 8
    assert len(sizes) < 20
    assert threading.get_ident() not in threads  # the tail ran off the event loop


async def test_full_queue_refuses_with_busy() -> None:
    release = threading.Event()

    def blocked(items: Sequence[int]) -> list[int]:
        release.wait(5)
        return list(items)

    limits = BatchLimits(max_batch=1, max_wait=0.0, max_queue=2)
    async with Batcher(blocked, limits=limits) as batcher:
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)  # the collector takes item 0 and blocks in the tail
        queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(ProtocolError) as info:
            await batcher.submit(3)
        assert info.value.code == 8
        release.set()
        assert await asyncio.gather(first, *queued) == [0, 1, 2]


async def test_tail_failure_reaches_every_waiter_and_batcher_survives() -> None:
    calls = 0

    def flaky(items: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return list(items)

    async with Batcher(flaky, limits=BatchLimits(max_batch=4, max_wait=0.02)) as batcher:
        results = await asyncio.gather(
            *(batcher.submit(i) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, ProtocolError) and r.code == 10 for r in results)
        assert await batcher.submit(7) == 7


async def test_drain_finishes_queued_work_then_refuses() -> None:
    def slow(items: Sequence[int]) -> list[int]:
        threading.Event().wait(0.01)
        return list(items)

    batcher: Batcher[int, int] = Batcher(slow, limits=BatchLimits(max_batch=2, max_wait=0.0))
    async with batcher:
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(6)]
        await asyncio.sleep(0)
    assert [t.result() for t in tasks] == list(range(6))
    with pytest.raises(ProtocolError) as info:
        await batcher.submit(1)
    assert info.value.code == 12


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError):
        BatchLimits(max_batch=0)
    with pytest.raises(ConfigError):
        BatchLimits(max_batch=8, max_queue=4)
    with pytest.raises(ConfigError):
        BatchLimits(max_wait=-1.0)


class StepExecutor(Executor):
    """Runs nothing until the test says so: ``calls`` holds what was submitted, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.calls.append((fn, args, future))
        return future

    @property
    def batches(self) -> list[list[int]]:
        return [list(args[0]) for _, args, _ in self.calls]

    def release(self, index: int) -> None:
        fn, args, future = self.calls[index]
        future.set_result(fn(*args))


async def _until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (bounded, not a timing assertion)."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - polling a fake, one loop turn at a time
            await asyncio.sleep(0)


def _frozen() -> float:
    return 0.0  # a clock that never moves: max_wait can never be what dispatches


async def test_a_lone_request_is_dispatched_at_once_by_an_idle_worker() -> None:
    executor = StepExecutor()
    limits = BatchLimits(max_batch=8, max_wait=10.0)
    async with Batcher(list, limits=limits, executor=executor, clock=_frozen) as batcher:
        answer = asyncio.create_task(batcher.submit(1))
        await _until(lambda: bool(executor.calls))
        assert executor.batches == [[1]]
        executor.release(0)
        assert await answer == 1


async def test_requests_queued_while_the_worker_is_busy_form_the_next_batches() -> None:
    executor = StepExecutor()
    limits = BatchLimits(max_batch=3, max_wait=10.0)
    async with Batcher(list, limits=limits, executor=executor, clock=_frozen) as batcher:
        answers = [asyncio.create_task(batcher.submit(0))]
        await _until(lambda: len(executor.calls) == 1)
        answers += [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
        await _until(lambda: batcher.queued == 5)
        for _ in range(10):
            await asyncio.sleep(0)
        assert executor.batches == [[0]]  # busy: nothing else dispatched meanwhile
        executor.release(0)
        await _until(lambda: len(executor.calls) == 2)
        assert executor.batches == [[0], [1, 2, 3]]  # everything queued, bounded by max_batch
        executor.release(1)
        await _until(lambda: len(executor.calls) == 3)
        assert executor.batches[2] == [4, 5]
        executor.release(2)
        assert await asyncio.gather(*answers) == list(range(6))
        assert (batcher.batches_run, batcher.items_run) == (3, 6)


async def test_batchers_sharing_a_worker_wait_for_it_to_go_idle() -> None:
    executor = StepExecutor()
    limits = BatchLimits(max_batch=8, max_wait=10.0)
    worker = TailWorker(executor)
    first = Batcher(list, limits=limits, worker=worker, clock=_frozen)
    second = Batcher(list, limits=limits, worker=worker, clock=_frozen)
    async with first, second:
        a = asyncio.create_task(first.submit(1))
        await _until(lambda: len(executor.calls) == 1)
        assert not worker.idle
        b = [asyncio.create_task(second.submit(i)) for i in (10, 11)]
        for _ in range(10):
            await asyncio.sleep(0)
        assert executor.batches == [[1]]  # the other tail's batch holds the worker
        executor.release(0)
        await _until(lambda: len(executor.calls) == 2)
        assert executor.batches[1] == [10, 11]
        executor.release(1)
        assert await a == 1
        assert await asyncio.gather(*b) == [10, 11]


async def test_max_wait_bounds_the_wait_for_a_busy_shared_worker() -> None:
    executor = StepExecutor()
    worker = TailWorker(executor)
    patient = Batcher(list, limits=BatchLimits(max_batch=8, max_wait=10.0), worker=worker)
    hasty = Batcher(list, limits=BatchLimits(max_batch=8, max_wait=0.0), worker=worker)
    async with patient, hasty:
        a = asyncio.create_task(patient.submit(1))
        await _until(lambda: len(executor.calls) == 1)
        b = asyncio.create_task(hasty.submit(2))
        await _until(lambda: len(executor.calls) == 2)  # queued behind the running batch
        assert executor.batches == [[1], [2]]
        executor.release(0)
        executor.release(1)
        assert (await a, await b) == (1, 2)


async def test_a_full_batch_does_not_wait_for_a_busy_shared_worker() -> None:
    executor = StepExecutor()
    worker = TailWorker(executor)
    limits = BatchLimits(max_batch=2, max_wait=10.0)
    first = Batcher(list, limits=limits, worker=worker, clock=_frozen)
    second = Batcher(list, limits=limits, worker=worker, clock=_frozen)
    async with first, second:
        a = asyncio.create_task(first.submit(1))
        await _until(lambda: len(executor.calls) == 1)
        b = [asyncio.create_task(second.submit(i)) for i in (10, 11)]
        await _until(lambda: len(executor.calls) == 2)
        assert executor.batches == [[1], [10, 11]]
        executor.release(0)
        executor.release(1)
        assert await a == 1
        assert await asyncio.gather(*b) == [10, 11]


def test_a_batcher_takes_a_worker_or_an_executor_not_both() -> None:
    with pytest.raises(ConfigError):
        Batcher(list, limits=BatchLimits(), executor=StepExecutor(), worker=TailWorker())
