"""The fail-over benchmark's rig: the digits package, edge processes behind link shapers, a
paced task stream that records every task, the fault driver and the device's log.

Edges are ``secure_ci.testing._edge_process`` processes (so kill -9 and SIGSTOP are real);
each is reached through its own :func:`~secure_ci.testing.open_link_shaper` relay in the
device's event loop (so a link can be cut). Head runs are counted by wrapping the device's
``LocalModel.encode`` (and ``run``, ``finish``) on the instance, per input tensor: the fleet
code is measured as it is, not trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import percentile

from secure_ci.cli._demo import default_cache_dir
from secure_ci.device import Device, DeviceIdentity, TaskOutcome, open_device
from secure_ci.device._journal import DeviceJournal
from secure_ci.package import ModelPackage, load_package, pack_bytes
from secure_ci.testing import DEV_NOW, Link, LinkShaper, open_link_shaper
from secure_ci.testing._edge_process import EdgeProcess, _read_line, dev_fleet_policy
from secure_ci.zoo._digits import DIGITS_INPUT_SHAPE
from secure_ci.zoo._train import load_trained_digits

KEY = bytes.fromhex("5a" * 32)
SPARE = Path(__file__).resolve().parent / "_failover_edge.py"
FLEET_LOGGER = "secure_ci.device._fleet"
LIMIT = re.compile(r"no result within ([0-9.]+) s")


PROCESSES = ThreadPoolExecutor(max_workers=8, thread_name_prefix="failover-processes")
"""Reaping and (re)starting edge processes blocks for seconds: not in the device's threads."""
SLOWDOWN = 100.0  # x the profile: device-only ~55 ms, so a loaded host still offloads
DELAY_MS = 5.0
DEADLINE_MS = 1000.0
ATTEMPT_CAP_S = 2.0
START_TIMEOUT_S = 300.0
"""An edge process imports torch and web3: a minute or more on a loaded 2-core machine."""


@dataclass(frozen=True)
class Size:
    baseline: int
    chaos: int
    rate: float
    window: int
    gap_s: float
    hold_s: float
    offline_s: float
    offline_rate: float
    after_resume: int
    ledger_tasks: int = 60  # the ledger phase: tasks over three edges on a chain


def figures(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "max": round(max(values), 3),
    }


@dataclass(frozen=True)
class Digits:
    package_path: Path
    package: ModelPackage
    samples: torch.Tensor  # (n, 1, 32, 32): every held-out digit
    expected: torch.Tensor  # (n, 10): the package's model run here


def build_digits(workdir: Path) -> Digits:
    """The trained digits CNN packed (with its measured profile) and its held-out digits."""
    trained = load_trained_digits(default_cache_dir())
    x, y = trained.data.test_x, trained.data.test_y
    path = workdir / "digits.scipkg"
    path.write_bytes(
        pack_bytes(
            trained.model, architecture="digits_cnn", input_shape=DIGITS_INPUT_SHAPE,
            calibration=(x[:64], y[:64]), calibration_source="first 64 held-out digits",
            repeats=1, exits=(),
        )
    )  # fmt: skip
    package = load_package(path)
    with torch.inference_mode():
        expected = package.partitioner().model(x)
    return Digits(path, package, x.contiguous(), expected)


def matches(output: torch.Tensor, expected: torch.Tensor, atol: float = 0.05) -> bool:
    """Same class and close values (int8 features move logits a little)."""
    output = output.reshape(expected.shape)
    return bool(
        int(output.argmax()) == int(expected.argmax())
        and torch.allclose(output, expected, atol=atol, rtol=0)
    )


class LogTape(logging.Handler):
    """Every record of the fleet device's logger, with the monotonic time it was emitted
    (the clock of the event loop, the shapers and the fault driver)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[float, logging.LogRecord]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((time.monotonic(), record))

    def failed_attempts(self, edge: str, outcomes: set[str], after: float) -> list[float]:
        """Times of attempts at ``edge`` that ended in one of ``outcomes`` after ``after``."""
        return [
            t for t, r in self.records
            if r.msg.startswith("task failed over") and isinstance(r.args, tuple)
            and r.args[0] == edge and r.args[1] in outcomes and t >= after
        ]  # fmt: skip

    def connect_failures(self, edge: str, after: float, before: float) -> int:
        return sum(
            r.msg.startswith("cannot connect") and isinstance(r.args, tuple)
            and r.args[0] == edge and after <= t <= before
            for t, r in self.records
        )  # fmt: skip

    def session_failures(self, edge: str, after: float) -> list[float]:
        return [
            t for t, r in self.records
            if r.msg.startswith("session with edge") and "failed" in r.msg
            and isinstance(r.args, tuple) and r.args[0] == edge and t >= after
        ]  # fmt: skip


class LoopWatch:
    """How late the event loop (device, shapers, driver: one loop) wakes a 1 ms sleeper:
    a stall delays everything on it, a crash's detection too."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.stalls: list[tuple[float, float]] = []
        """(monotonic time the sleeper woke, ms it woke late), for stalls over 1 ms."""

    async def run(self, done: asyncio.Event) -> None:
        while not done.is_set():
            asked = time.monotonic()
            await asyncio.sleep(self.period)
            woke = time.monotonic()
            late_ms = (woke - asked - self.period) * 1e3
            if late_ms > 1.0:
                self.stalls.append((woke, late_ms))

    def worst(self, start: float, end: float) -> float:
        """The longest stall (ms) overlapping [start, end]; 0 if none."""
        return max(
            (ms for woke, ms in self.stalls if woke >= start and woke - ms / 1e3 <= end),
            default=0.0,
        )


@contextlib.contextmanager
def tape_fleet_log() -> Any:
    logger = logging.getLogger(FLEET_LOGGER)
    tape, level = LogTape(), logger.level
    logger.addHandler(tape)
    logger.setLevel(logging.INFO)
    try:
        yield tape
    finally:
        logger.removeHandler(tape)
        logger.setLevel(level)


@dataclass
class HeadCounter:
    """Calls of the device's head (``encode``), whole model (``run``) and local tail
    (``finish``) per input tensor: a task whose head ran twice would show here. Every
    counted tensor is kept alive, so that its ``id`` is never reused by a later stream's
    input (which would count another task's head run as this one's)."""

    encode: Counter[int] = field(default_factory=Counter)
    run: Counter[int] = field(default_factory=Counter)
    finish: int = 0
    seen: dict[int, torch.Tensor] = field(default_factory=dict)

    def install(self, device: Device) -> None:
        local = device.local
        encode, run, finish = local.encode, local.run, local.finish

        def counted_encode(inputs: tuple[torch.Tensor, ...], cut: int, codec: str) -> Any:
            self.seen[id(inputs[0])] = inputs[0]
            self.encode[id(inputs[0])] += 1
            return encode(inputs, cut, codec)

        def counted_run(inputs: tuple[torch.Tensor, ...]) -> Any:
            self.seen[id(inputs[0])] = inputs[0]
            self.run[id(inputs[0])] += 1
            return run(inputs)

        def counted_finish(cut: int, payload: bytes) -> Any:
            self.finish += 1
            return finish(cut, payload)

        setattr(local, "encode", counted_encode)  # noqa: B010 - instance wrapper, on purpose
        setattr(local, "run", counted_run)  # noqa: B010
        setattr(local, "finish", counted_finish)  # noqa: B010


@dataclass
class Fleet:
    edges: list[EdgeProcess]
    shapers: list[LinkShaper]
    device: Device
    heads: HeadCounter
    journal: DeviceJournal
    tape: LogTape
    down: set[int] = field(default_factory=set)
    """Edges killed or stopped, or whose link is cut, right now (no second fault on them)."""

    def index(self, address: str | None) -> int | None:
        for i, s in enumerate(self.shapers):
            if s.address == address:
                return i
        return None


@contextlib.asynccontextmanager
async def open_fleet(
    edges: list[EdgeProcess], package: ModelPackage, journal: DeviceJournal, *,
    slowdown: float, delay_ms: float, deadline_ms: float, attempt_cap: float,
) -> AsyncIterator[Fleet]:  # fmt: skip
    """A fleet device over ``edges``, each through a shaper of ``delay_ms`` each way."""
    policy, pki = dev_fleet_policy()
    link = Link(delay_ms=delay_ms)
    async with contextlib.AsyncExitStack() as stack:
        shapers = [
            await stack.enter_async_context(open_link_shaper(e.port, uplink=link, downlink=link))
            for e in edges
        ]
        tape = stack.enter_context(tape_fleet_log())
        device = await stack.enter_async_context(
            open_device(
                [s.address for s in shapers],
                package=package,
                identity=DeviceIdentity(KEY),
                policy=policy,
                collateral=pki.collateral,
                journal=journal,
                clock=lambda: float(DEV_NOW),
                slowdown=slowdown,
                deadline_ms=deadline_ms,
                attempt_cap=attempt_cap,
                edge_only=False,
                early_exits=False,
            )
        )
        await device.wait_ready(timeout=60.0)
        heads = HeadCounter()
        heads.install(device)
        yield Fleet(edges, shapers, device, heads, journal, tape)


@dataclass(frozen=True)
class TaskRecord:
    index: int
    submitted_s: float
    """Since the stream started (monotonic)."""
    latency_ms: float
    mode: str
    edge: int | None
    attempts: tuple[tuple[int | None, str, float, float | None], ...]
    """(edge, outcome, ms, adaptive timeout in s for a ``timeout``); ``no-session`` is a
    ``failed`` attempt never sent (the edge's session had just failed)."""
    heads: int
    """Head (or whole-model) runs of this task on the device."""
    ok: bool
    task_id: str | None


def _record(
    fleet: Fleet, index: int, submitted: float, x: torch.Tensor, outcome: TaskOutcome,
    expected: torch.Tensor,
) -> TaskRecord:  # fmt: skip
    attempts = []
    for a in outcome.attempts:
        found = LIMIT.search(a.detail)
        limit = float(found.group(1)) if found and a.outcome == "timeout" else None
        ended = "no-session" if a.detail == "no session" else a.outcome
        attempts.append((fleet.index(a.edge), ended, a.ms, limit))
    output = outcome.output if isinstance(outcome.output, torch.Tensor) else outcome.output[0]
    heads = fleet.heads.encode[id(x)] + fleet.heads.run[id(x)]
    receipt = outcome.receipt
    return TaskRecord(
        index, submitted, outcome.latency_ms, outcome.mode, fleet.index(outcome.edge),
        tuple(attempts), heads, matches(output, expected),
        None if receipt is None else receipt.request.task_id.hex(),
    )  # fmt: skip


async def stream(
    fleet: Fleet, digits: Digits, count: int, *, offset: int, rate: float, window: int,
    submitted: Callable[[], None] = lambda: None,
) -> tuple[list[TaskRecord], float]:  # fmt: skip
    """``count`` tasks at ``rate`` per second, at most ``window`` in flight (a camera
    stream that waits when the device falls behind); the records and the seconds taken."""
    n = len(digits.samples)
    slots = asyncio.Semaphore(window)
    records: list[TaskRecord] = []
    inputs = [digits.samples[(offset + i) % n : (offset + i) % n + 1].clone() for i in range(count)]
    start = time.monotonic()

    async def one(i: int) -> None:
        x = inputs[i]
        try:
            at = time.monotonic() - start
            submitted()
            outcome = await fleet.device.run(x)
        finally:
            slots.release()
        index = (offset + i) % n
        records.append(_record(fleet, i, at, x, outcome, digits.expected[index]))

    async with asyncio.TaskGroup() as group:
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            await slots.acquire()
            group.create_task(one(i))
    return sorted(records, key=lambda r: r.index), time.monotonic() - start


class Spares:
    """Warm spare edges (``_failover_edge.py``): a killed edge restarts on its port in the
    time it takes to bind, not to import torch. Without a spare, a cold restart."""

    def __init__(self, package: Path, devices: tuple[str, ...], seed: int) -> None:
        self.package, self.devices, self.seed = package, devices, seed
        self._ready: list[subprocess.Popen[str]] = []
        self._lock = threading.Lock()
        self.cold = 0

    def add(self, timeout: float) -> None:
        """Start one more spare; returns once it is loaded (blocking)."""
        allow = [arg for d in self.devices for arg in ("--allow-device", d)]
        proc = subprocess.Popen(
            [sys.executable, str(SPARE), str(self.package), "--pki-seed", str(self.seed), *allow],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            line = _read_line(proc, timeout)
            if line != "warm":
                raise RuntimeError(f"spare edge said {line!r}")
        except BaseException:
            _reap(proc)
            raise
        with self._lock:
            self._ready.append(proc)

    def restart(self, edge: EdgeProcess, timeout: float) -> bool:
        """Serve ``edge``'s port again (after it was killed); True if a spare did it."""
        with self._lock:
            proc = self._ready.pop() if self._ready else None
        if proc is None:
            self.cold += 1
            edge.restart(timeout)
            return False
        assert proc.stdin is not None
        proc.stdin.write(f"{edge.port}\n")
        proc.stdin.close()
        line = _read_line(proc, timeout)
        if line != f"port {edge.port}":
            _reap(proc)
            raise RuntimeError(f"spare edge said {line!r}")
        edge.proc = proc
        return True

    def close(self) -> None:
        with self._lock:
            spares, self._ready = self._ready, []
        for proc in spares:
            _reap(proc)


def _reap(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()
