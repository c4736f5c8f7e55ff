"""Measuring head and tail latency at every cut (median of repeats, fixed thread count)."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from secure_ci.exceptions import PartitionError
from secure_ci.partition._guard import running
from secure_ci.partition._partitioner import Partitioner
from secure_ci.partition._profiles import CutProfile, Profile

__all__ = ["profile"]

MAX_REPEATS = 10_000


def median_ms(fn: Callable[[], Any], repeats: int, clock: Callable[[], float]) -> float:
    """Median milliseconds of ``repeats`` timed calls of ``fn`` after one warm-up call."""
    fn()  # warm-up: allocator, lazy initialisation
    samples = []
    for _ in range(repeats):
        start = clock()
        fn()
        samples.append((clock() - start) * 1000.0)
    return statistics.median(samples)


def profile(
    partitioner: Partitioner,
    *,
    repeats: int = 5,
    threads: int = 1,
    batch: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> Profile:
    """Median head and tail latency of every cut, with ``threads`` intra-op threads.

    The example inputs are repeated along the batch dimension to ``batch`` rows (per example
    row). The process-wide torch thread count is restored afterwards.
    """
    for value, what, top in ((repeats, "repeats", MAX_REPEATS), (threads, "threads", 1024)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise PartitionError(f"{what} must be an integer in [1, {top}], got {value!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 4096:
        raise PartitionError(f"batch must be an integer in [1, 4096], got {batch!r}")
    inputs = tuple(torch.cat([t] * batch) if t.dim() else t for t in partitioner.example_inputs)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with running(), torch.no_grad():
            full_ms = median_ms(lambda: partitioner.model(*inputs), repeats, clock)
            cuts = []
            for cut in partitioner.cuts:
                head, tail = partitioner.split(cut)
                boundary: tuple[torch.Tensor, ...] = head(*inputs)
                cuts.append(
                    CutProfile(
                        index=cut.index,
                        name=cut.name,
                        head_ms=median_ms(functools.partial(head, *inputs), repeats, clock),
                        tail_ms=median_ms(functools.partial(tail, *boundary), repeats, clock),
                        nbytes=sum(4 * b.numel() for b in boundary),
                    )
                )
    finally:
        torch.set_num_threads(previous)
    return Profile(
        model_id=partitioner.model_id,
        threads=threads,
        batch=batch,
        repeats=repeats,
        full_ms=full_ms,
        cuts=tuple(cuts),
    )
