"""The fail-over benchmark's offline phase: every edge killed, then the device process too
(with a task in flight), the edges back, the device started again to resume its journal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from _failover_device import digest
from _failover_rig import (
    ATTEMPT_CAP_S,
    DEADLINE_MS,
    PROCESSES,
    SLOWDOWN,
    START_TIMEOUT_S,
    Digits,
    Size,
    Spares,
    figures,
    matches,
)

from secure_ci.device._journal import DeviceJournal
from secure_ci.partition._codec import encode_features
from secure_ci.testing._edge_process import EdgeProcess

CHILD = Path(__file__).resolve().parent / "_failover_device.py"


class _Child:
    """A device process and the JSON lines it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())
        self.spawned = time.time()

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(json.loads(line))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.lines if e["event"] == name]

    async def until(self, name: str, count: int = 1, timeout: float = 180.0) -> float:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while len(self.events(name)) < count:
                if self.reader.done():
                    raise RuntimeError(f"the device process ended before {name!r}")
                await asyncio.sleep(0.02)
        return float(self.events(name)[count - 1]["t"])


def _pending(journal: Path) -> int:
    """Tasks the journal holds begun and unfinished, read-only (the device is stopped)."""
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT COUNT(*) FROM pending").fetchone()[0])


async def _kill_mid_task(proc: asyncio.subprocess.Process, journal: Path) -> float:
    """SIGKILL the device while the journal shows a task begun and unfinished: freeze it
    (SIGSTOP), look, and let it run a little longer if nothing is in flight. Its time."""
    for _ in range(200):
        proc.send_signal(signal.SIGSTOP)
        if await asyncio.to_thread(_pending, journal):
            break
        proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.013)
    killed = time.time()
    proc.kill()
    await proc.wait()
    return killed


async def _device(args: list[str]) -> _Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), *args, stdout=asyncio.subprocess.PIPE
    )
    return _Child(proc)


def _offline_summary(
    digits: Digits, first: _Child, second: _Child, times: dict[str, float], size: Size,
    pending: dict[int, str], journal_path: Path, planned_after: int,
) -> dict[str, Any]:  # fmt: skip
    index_of = {_digest(digits, i): i for i in range(len(digits.samples))}
    begun = {e["key"]: e["digest"] for c in (first, second) for e in c.events("begun")}
    begun |= pending
    finished = first.events("done") + second.events("resumed") + second.events("done")
    wrong = sum(
        not matches(torch.tensor(e["output"]), digits.expected[index_of[begun[e["key"]]]])
        for e in finished
    )
    with DeviceJournal.open(journal_path) as journal:
        no_outcome = [k for k in begun if journal.outcome(k) is None]
        unfinished = len(journal.unfinished())
    reported = {e["key"] for e in finished}
    first_keys = {e["key"] for e in first.events("begun")}
    t_off, t_kill = times["edges_down"], times["device_killed"]
    offline = [e for e in first.events("done") if t_off <= e["t"] - e["latency_ms"] / 1e3]
    return {
        "offline_s": size.offline_s,
        "deadline_ms": DEADLINE_MS,
        "offline_tasks": len(offline),
        "offline_modes": dict(Counter(e["mode"] for e in offline)),
        "offline_latency_ms": figures([e["latency_ms"] for e in offline]),
        "offline_over_deadline": sum(e["latency_ms"] > DEADLINE_MS for e in offline),
        "tasks_begun_before_device_kill": len(first_keys),
        "unfinished_at_device_kill": len(pending),
        "unannounced_at_device_kill": len(set(pending) - {e["key"] for e in first.events("begun")}),
        "resumed": len(second.events("resumed")),
        "resumed_modes": dict(Counter(e["mode"] for e in second.events("resumed"))),
        "finished_but_unreported_at_kill": len(first_keys - reported - set(no_outcome)),
        "after_resume_tasks": len(second.events("done")),
        "after_resume_modes": dict(Counter(e["mode"] for e in second.events("done"))),
        "lost": len(no_outcome) + planned_after - len(second.events("done")),
        "wrong": wrong,
        "journal_unfinished_at_end": unfinished,
        "edges_restart_s": round(times["edges_back"] - times["edges_restarting"], 3),
        "device_start_s": round(times["device_ready"] - times["device_spawned"], 3),
        "resume_s": round(times["resumed"] - times["device_ready"], 3),
        "edges_back_to_synced_s": round(times["resumed"] - times["edges_back"], 3),
        "timeline": {
            "events_s": {k: round(v - t_off, 3) for k, v in times.items()},
            "tasks": [
                [round(e["t"] - t_off, 3), round(e["latency_ms"], 2), e["mode"], run]
                for run, c in ((1, first), (2, second))
                for e in c.events("done") + c.events("resumed")
            ],
        },
        "device_killed_after_offline_s": round(t_kill - t_off, 3),
    }


def _digest(digits: Digits, index: int) -> str:
    return digest(encode_features((digits.samples[index : index + 1].clone(),), "float32"))


async def offline_phase(
    digits: Digits, edges: list[EdgeProcess], spares: Spares, size: Size, workdir: Path
) -> dict[str, Any]:
    samples = workdir / "samples.bin"
    samples.write_bytes(encode_features((digits.samples,), "float32"))
    journal = workdir / "device.db"
    common = [
        "--package", str(digits.package_path), "--samples", str(samples),
        "--journal", str(journal), "--edges", ",".join(e.address for e in edges),
        "--rate", str(size.offline_rate), "--window", str(size.window),
        "--slowdown", str(SLOWDOWN), "--deadline-ms", str(DEADLINE_MS),
        "--attempt-cap", str(ATTEMPT_CAP_S),
    ]  # fmt: skip
    planned = int(size.offline_rate * (size.offline_s + 60))
    indices = list(range(min(planned, len(digits.samples))))
    times: dict[str, float] = {}
    first = await _device([*common, "--indices", ",".join(map(str, indices))])
    second: _Child | None = None
    try:
        await first.until("ready")
        await first.until("done", 10)
        times["edges_down"] = time.time()
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(PROCESSES, e.kill) for e in edges))
        await asyncio.sleep(size.offline_s / 2)
        times["device_killed"] = await _kill_mid_task(first.proc, journal)
        await first.reader
        with DeviceJournal.open(journal) as j:
            # a task can be on disk and not yet announced: the journal says which it is
            pending = {row[0]: digest(row[1]) for row in j.unfinished()}
        await asyncio.sleep(size.offline_s / 2)
        times["edges_restarting"] = time.time()
        await asyncio.gather(
            *(loop.run_in_executor(PROCESSES, spares.restart, e, START_TIMEOUT_S) for e in edges)
        )
        times["edges_back"] = time.time()
        index_of = {_digest(digits, i): i for i in indices}
        started = {index_of[e["digest"]] for e in first.events("begun")}
        started |= {index_of[d] for d in pending.values()}
        rest = [i for i in indices if i not in started][: size.after_resume]
        times["device_spawned"] = time.time()
        second = await _device([*common, "--indices", ",".join(map(str, rest)), "--resume"])
        times["device_ready"] = await second.until("ready")
        times["resumed"] = await second.until("resumed_all")
        await second.until("finished")
        await second.proc.wait()
        await second.reader
    finally:
        for child in (first, second):
            if child is not None and child.proc.returncode is None:
                child.proc.kill()
                await child.proc.wait()
    return _offline_summary(digits, first, second, times, size, pending, journal, len(rest))
