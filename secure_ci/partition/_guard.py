"""Keeping torch.fx tracing away from models running on other threads.

``torch.fx.symbolic_trace`` patches ``nn.Module.__call__`` for the whole process while it
traces. A model called on another thread in that window is recorded into the graph being
traced and gets a ``Proxy`` back instead of a tensor (the demo failed once in CI with
"symbolically traced variables cannot be used as inputs to control flow"). Tracing
therefore holds :func:`tracing` (exclusive) and every model call holds :func:`running`
(shared): calls run concurrently with each other, never with a trace.

``running`` is re-entrant per thread, so a waiting trace cannot deadlock a thread that
already runs a model; a waiting trace is served before new callers so it cannot starve. A
long hold (profiling or fitting exits while packing, seconds) with a trace queued behind it
delays every new model call in the process: packing and serving belong in separate
processes (training loops hold the guard one step at a time).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_cond = threading.Condition()
_local = threading.local()
_runners = 0
_tracer: int | None = None  # the thread holding tracing()
_tracers_waiting = 0


def _depth() -> int:
    return getattr(_local, "depth", 0)


@contextmanager
def running() -> Iterator[None]:
    """Hold while calling a model: waits out any trace in progress."""
    global _runners
    me = threading.get_ident()
    if _depth() == 0 and _tracer != me:
        with _cond:
            while _tracer is not None or _tracers_waiting:
                _cond.wait()
            _runners += 1
    _local.depth = _depth() + 1
    try:
        yield
    finally:
        _local.depth -= 1
        if _local.depth == 0 and _tracer != me:
            with _cond:
                _runners -= 1
                _cond.notify_all()


@contextmanager
def tracing() -> Iterator[None]:
    """Hold while tracing or exporting a model: no model runs on another thread meanwhile."""
    global _tracer, _tracers_waiting
    me = threading.get_ident()
    if _tracer == me:  # nested trace on the same thread
        yield
        return
    if _depth():
        raise RuntimeError("cannot trace a model from inside a model call")
    with _cond:
        _tracers_waiting += 1
        try:
            while _tracer is not None or _runners:
                _cond.wait()
        finally:
            _tracers_waiting -= 1
        _tracer = me
    try:
        yield
    finally:
        with _cond:
            _tracer = None
            _cond.notify_all()
