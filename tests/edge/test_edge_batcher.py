"""Dynamic batching: grouping, ordering, back-pressure, failures, drain."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from secure_ci.edge import Batcher, BatchLimits
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
