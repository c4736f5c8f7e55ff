"""The fail-over benchmark's fault driver: kill -9, SIGSTOP, cut and frozen links, in turn,
on the edge the device is using; and when the device noticed each (its logger's records).

A crash's detection is timed from the edge's death, not from the kill signal: SIGKILL is
sent at once, but a torch process takes tens of milliseconds (more on a loaded machine) to
be torn down before its kernel closes its sockets; until then there is nothing to detect.
The death is the first of: the edge's shaper reading the end of its connection (the
kernel closed the socket: EOF or reset) and the process being reaped (a thread waiting on
it). The device's first reaction is the first failed attempt at that edge or the keeper
seeing its session fail, whichever comes first (the fleet logger's records). The
breakdown: kill -> death (process teardown), the shaper relaying the close to the device
(at once for a reset, after the link's one-way delay for an EOF, as a FIN would travel),
the device's own reaction from then, and the longest event-loop stall in between."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import Counter
from typing import Any

from _failover_rig import PROCESSES, START_TIMEOUT_S, Fleet, LoopWatch, Size, Spares

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
        fault["at"] = time.monotonic()
        fault["start_s"] = fault["at"] - start
        faults.append(fault)
        process, shaper = fleet.edges[edge], fleet.shapers[edge]
        if kind == "kill":
            process.proc.kill()  # SIGKILL now; reaped (and restarted) in other threads
            _watch_death(process.proc, fault)
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


def _watch_death(proc: Any, fault: dict[str, Any]) -> None:
    """Stamp ``fault["reaped"]`` (monotonic) once the killed process is gone, from a thread
    of its own (the shared executor may be busy starting spares)."""

    def wait() -> None:
        proc.wait()
        fault["reaped"] = time.monotonic()

    threading.Thread(target=wait, name="failover-reaper", daemon=True).start()


def _ms(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else round((later - earlier) * 1e3, 3)


def _crash(fleet: Fleet, fault: dict[str, Any], until: float, loop: LoopWatch) -> None:
    """The breakdown of one kill (see the module docstring); times in ms."""
    at, edge = fault["at"], fault["edge"]
    address = fleet.shapers[edge].address
    closes = [c for c in fleet.shapers[edge].closes() if at <= c.target_at < until]
    close = closes[0] if closes else None
    reaped = fault.pop("reaped", None)
    seen = [t for t in (close and close.target_at, reaped) if t is not None]
    death = min(seen) if seen else None
    attempts = [t for t in fleet.tape.failed_attempts(address, {"failed", "refused"}, at)
                if t < until]  # fmt: skip
    sessions = [t for t in fleet.tape.session_failures(address, at) if t < until]
    first_attempt = attempts[0] if attempts else None
    session = sessions[0] if sessions else None
    reactions = [t for t in (first_attempt, session) if t is not None]
    reaction = min(reactions) if reactions else None
    relayed = close.device_at if close is not None else None
    fault.update(
        first_attempt_ms=_ms(first_attempt, death),
        session_failed_ms=_ms(session, death),
        reaction_ms=_ms(reaction, death),
        kill_to_death_ms=_ms(death, at),
        kill_to_reaped_ms=_ms(reaped, at),
        kill_to_close_ms=_ms(close and close.target_at, at),
        close=None if close is None else close.how,
        close_relayed_ms=_ms(relayed, close and close.target_at),
        device_reaction_ms=_ms(reaction, relayed),
        loop_stall_ms=(
            round(loop.worst(death, reaction), 3)
            if death is not None and reaction is not None
            else None
        ),
        from_kill_first_attempt_ms=_ms(first_attempt, at),
        from_kill_session_failed_ms=_ms(session, at),
    )


def detection(fleet: Fleet, faults: list[dict[str, Any]], loop: LoopWatch) -> None:
    """Per fault, from the fleet logger's records: when the device noticed."""
    for fault, after in zip(faults, [*faults[1:], None], strict=True):
        address = fleet.shapers[fault["edge"]].address
        at = fault["at"]
        until = math.inf if after is None else after["at"]  # not the next fault's doing
        if fault["kind"] == "kill":
            _crash(fleet, fault, until, loop)
            down_s = fault["end_s"] - fault["start_s"]  # the keeper's reconnects meanwhile
            retries = fleet.tape.connect_failures(address, at, at + down_s)
            fault["reconnects_per_s"] = round(retries / down_s, 2) if down_s > 0 else None
        else:  # a cut resets the connections: the shaper's cut is the origin
            broken = {"failed", "refused"} if fault["kind"] == "cut" else {"timeout"}
            attempts = [t for t in fleet.tape.failed_attempts(address, broken, at) if t < until]
            sessions = [t for t in fleet.tape.session_failures(address, at) if t < until]
            fault["first_attempt_ms"] = _ms(attempts[0], at) if attempts else None
            fault["session_failed_ms"] = _ms(sessions[0], at) if sessions else None
    for fault in faults:
        fault["start_s"] = round(fault["start_s"], 3)
        fault["end_s"] = round(fault.get("end_s", fault["start_s"]), 3)
        del fault["at"]
