"""Tracing never sees a model running on another thread (torch.fx patches nn.Module)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from secure_ci.partition._guard import running, tracing
from secure_ci.partition._trace import trace


def test_a_model_running_beside_a_trace_gets_tensors_back() -> None:
    # Unguarded, ~5 % of these calls returned a torch.fx Proxy (measured before the fix).
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    wrong: list[object] = []
    done = threading.Event()

    def run() -> None:
        x = torch.zeros(1, 8)
        while not done.is_set():
            with running(), torch.inference_mode():
                y = model(x)
            if not isinstance(y, torch.Tensor):
                wrong.append(type(y))

    worker = threading.Thread(target=run)
    worker.start()
    try:
        for _ in range(150):
            traced = trace(model, (torch.zeros(1, 8),))
            assert [n.op for n in traced.gm.graph.nodes].count("call_module") == 3
    finally:
        done.set()
        worker.join(timeout=30)
    assert not wrong


def test_running_is_reentrant_and_tracing_inside_it_is_refused() -> None:
    refused = pytest.raises(RuntimeError, match="inside a model call")
    with running(), running(), refused, tracing():
        pass
    with tracing(), tracing(), running():  # the tracing thread itself may run models
        pass


def test_a_waiting_trace_is_served_before_new_callers() -> None:
    order: list[str] = []
    first_in = threading.Event()
    release = threading.Event()

    def first() -> None:
        with running():
            first_in.set()
            release.wait(10)
            order.append("first out")

    def tracer() -> None:
        with tracing():
            order.append("traced")

    def late() -> None:
        with running():
            order.append("late ran")

    a = threading.Thread(target=first)
    a.start()
    assert first_in.wait(10)
    t = threading.Thread(target=tracer)
    t.start()
    while not _tracer_waiting():
        threading.Event().wait(0.001)
    b = threading.Thread(target=late)
    b.start()
    release.set()
    for thread in (a, t, b):
        thread.join(timeout=10)
    assert order == ["first out", "traced", "late ran"]


def _tracer_waiting() -> bool:
    from secure_ci.partition import _guard

    return _guard._tracers_waiting > 0
