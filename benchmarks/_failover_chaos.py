"""The fail-over benchmark's fault driver: kill -9, SIGSTOP, cut and frozen links, in turn,
on the edge the device is using; and when the device noticed each (its logger's records)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from typing import Any

from _failover_rig import PROCESSES, START_TIMEOUT_S, Fleet, Size, Spares

CYCLE = ("kill", "stop", "kill", "cut", "kill", "freeze")


def _target(fleet: Fleet) -> int | None:
    """The edge the planner sends to, else the one that took most of the last tasks."""
    current = fleet.device.planner.current
    edge = fleet.index(current.edge) if current is not None else None
    if edge is not None and edge not in fleet.down:
        return edge
    recent = Counter(fleet.index(o.edge) for o in list(fleet.device.history)[-50:])
    for edge, _ in recent.most_common():
        if edge is not None and edge not in fleet.down:
            return edge
    live = [i for i in range(len(fleet.edges)) if i not in fleet.down]
    return live[0] if live else None


async def _sleep_unless(done: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``; True if ``done`` was set meanwhile."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await done.wait()
    return done.is_set()


async def drive_faults(
    fleet: Fleet, size: Size, start: float, done: asyncio.Event, submitted: asyncio.Event,
    restarts: list[asyncio.Task[None]], spares: Spares, refills: list[asyncio.Future[None]],
) -> list[dict[str, Any]]:  # fmt: skip
    faults: list[dict[str, Any]] = []
    for turn in range(10**6):
        if await _sleep_unless(done, size.gap_s):
            break
        kind = CYCLE[turn % len(CYCLE)]
        edge = _target(fleet)
        if edge is None:
            continue
        if kind == "kill":  # land it while a task is in flight
            submitted.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await submitted.wait()
            await asyncio.sleep(0.01)
            edge = _target(fleet)
            if edge is None:
                continue
        fault: dict[str, Any] = {"kind": kind, "edge": edge}
        fleet.down.add(edge)
        fault["wall"], fault["start_s"] = time.time(), time.monotonic() - start
        faults.append(fault)
        process, shaper = fleet.edges[edge], fleet.shapers[edge]
        if kind == "kill":
            process.proc.kill()  # SIGKILL now; reaped (and restarted) in another thread
            restarts.append(
                asyncio.create_task(_restart(fleet, spares, refills, edge, fault, start))
            )
            continue
        if kind == "stop":
            process.stop()
        elif kind == "cut":
            shaper.cut("refuse")
        else:
            shaper.cut("blackhole", drop=False)
        await _sleep_unless(done, size.hold_s)
        if kind == "stop":
            process.cont()
        else:
            shaper.restore()
        fault["end_s"] = time.monotonic() - start
        fleet.down.discard(edge)
    return faults


async def _restart(
    fleet: Fleet, spares: Spares, refills: list[asyncio.Future[None]], edge: int,
    fault: dict[str, Any], start: float,
) -> None:  # fmt: skip
    loop, process = asyncio.get_running_loop(), fleet.edges[edge]
    await loop.run_in_executor(PROCESSES, process.kill)
    began = time.monotonic()
    fault["warm"] = await loop.run_in_executor(PROCESSES, spares.restart, process, START_TIMEOUT_S)
    fault["restart_s"] = round(time.monotonic() - began, 3)
    refills.append(loop.run_in_executor(PROCESSES, spares.add, START_TIMEOUT_S))
    fault["end_s"] = time.monotonic() - start
    fleet.down.discard(edge)


def detection(fleet: Fleet, faults: list[dict[str, Any]]) -> None:
    """Per fault, from the fleet logger's records: when the device noticed."""
    for fault, after in zip(faults, [*faults[1:], None], strict=True):
        address = fleet.shapers[fault["edge"]].address
        wall = fault["wall"]
        until = math.inf if after is None else after["wall"]  # not the next fault's doing
        # a killed edge's stream just ends: the session reports it as a protocol error
        broken = {"failed", "refused"} if fault["kind"] in ("kill", "cut") else {"timeout"}
        attempts = [t for t in fleet.tape.failed_attempts(address, broken, wall) if t < until]
        sessions = [t for t in fleet.tape.session_failures(address, wall) if t < until]
        fault["first_attempt_ms"] = round((attempts[0] - wall) * 1e3, 3) if attempts else None
        fault["session_failed_ms"] = round((sessions[0] - wall) * 1e3, 3) if sessions else None
        if fault["kind"] == "kill":  # the keeper's reconnects while the edge is down
            down_s = fault["end_s"] - fault["start_s"]
            retries = fleet.tape.connect_failures(address, wall, wall + down_s)
            fault["reconnects_per_s"] = round(retries / down_s, 2) if down_s > 0 else None
    for fault in faults:
        fault["start_s"] = round(fault["start_s"], 3)
        fault["end_s"] = round(fault.get("end_s", fault["start_s"]), 3)
        del fault["wall"]
