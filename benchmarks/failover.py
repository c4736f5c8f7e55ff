"""`secure-ci bench failover`: a fleet device under chaos, offline, and killed itself.

Everything is real: three edge processes (``secure_ci.testing._edge_process``: attested TLS
1.3, signed requests and results) serving the trained digits CNN's package, each reached
through its own link shaper (5 ms each way), and one fleet device (``open_device``, 100x
slowed so that it offloads, split cuts only, a write-ahead journal) running a paced stream
of held-out digits (``rate`` per second, at most ``window`` in flight). Every output is
compared with the package's model run here (same class, values within 0.05).

* **chaos**: a no-fault ``baseline`` stream, then the ``chaos`` stream while a driver cycles
  through faults, ``gap_s`` apart: kill -9 of the busiest edge (the one the planner sends
  to, killed ~10 ms after a task was submitted, so that tasks are in flight; restarted on
  the same port in the background by a warm spare process, ``_failover_edge.py``, as a
  cold start imports torch and web3: tens of seconds on a loaded 2-core machine), SIGSTOP
  of an edge for ``hold_s`` (then SIGCONT), a cut link (connections reset, new ones
  refused) and a frozen link (connections held silent, new ones blackholed). Reported:
  tasks lost (no output, or a wrong one), duplicate accepted results (task ids with more
  than one ``answered`` receipt in the journal; late ones are ``superseded``), fail-overs,
  the share of failed-over tasks whose head ran once (the device's ``LocalModel`` calls
  are counted per input), crash detection (to the first failed attempt at that edge, and
  to the device seeing the session fail, from the fleet logger's records; a killed
  edge's stream ends without a Close, which the session reports as a protocol error, so
  such attempts are ``refused`` rather than ``failed``: both count), timed from the edge's
  death (its kernel closing its socket, seen by the shaper, or the process reaped), not
  from the signal, with the breakdown (kill to death, the shaper relaying the close, the
  device's reaction, event-loop stalls; ``_failover_chaos``), hang detection
  (``timeout`` attempts: their duration against the adaptive timeout they had), and
  throughput and latency p50/p95 against the baseline.
* **offline**: a device process (``_failover_device.py``) streams tasks; every edge is
  killed for ``offline_s``; halfway through, the device process is killed with SIGKILL too
  (frozen with SIGSTOP until its journal shows a task begun and unfinished, then killed);
  the edges are restarted, then the device, which resumes from its journal. Reported: the
  offline tasks (all local, within the deadline?), the tasks begun before the kill and
  their fate (0 lost), and the time from the edges being back to the journal holding no
  unfinished task (device start-up, attestation and resume).

* **ledger** (``_failover_ledger``): three edges in this process on an in-process chain, a
  fleet device streaming digits, two edges killed in turn with a request at them; then every
  edge anchors its journal (the killed ones from disk) and every attempt the device sent to
  an edge and took elsewhere is looked for on the chain: anchored by that edge, or challenged
  there with the device's signed request. ``ledger_covered``: there were such attempts and
  none is invisible.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _failover_chaos import detection, drive_faults
from _failover_device import KEY as CHILD_KEY
from _failover_ledger import ledger_phase
from _failover_offline import offline_phase
from _failover_rig import (
    ATTEMPT_CAP_S,
    DEADLINE_MS,
    DELAY_MS,
    KEY,
    PROCESSES,
    SLOWDOWN,
    START_TIMEOUT_S,
    Digits,
    Fleet,
    LoopWatch,
    Size,
    Spares,
    TaskRecord,
    build_digits,
    figures,
    open_fleet,
    stream,
)

from secure_ci.device import DeviceIdentity
from secure_ci.device._journal import DeviceJournal
from secure_ci.testing._edge_process import PKI_SEED, EdgeProcess, spawn_edges

SPARES = 4
TARGETS = {"lost": 0, "duplicates": 0, "no_recompute_share": 0.95, "crash_detect_ms": 5.0,
           "synced_within_s": 10.0}  # fmt: skip
SIZES = {
    "smoke": Size(20, 40, 8.0, 4, 0.8, 0.8, 3.0, 10.0, 10, ledger_tasks=24),
    "quick": Size(100, 300, 20.0, 4, 1.5, 1.5, 4.0, 10.0, 20, ledger_tasks=90),
    "full": Size(250, 1000, 25.0, 4, 2.5, 2.0, 30.0, 10.0, 40, ledger_tasks=300),
}


def _journal_checks(journal: DeviceJournal, records: list[TaskRecord]) -> dict[str, int]:
    answered: Counter[bytes] = Counter()
    superseded = 0
    for task in journal.tasks():
        if task.state == "superseded":
            superseded += 1
        else:
            answered[task.task_id] += 1
    accepted = {r.task_id for r in records if r.task_id is not None}
    return {
        "answered_receipts": sum(answered.values()),
        "accepted_receipts": len(accepted),
        "duplicates": sum(c - 1 for c in answered.values() if c > 1),
        "superseded": superseded,
        "accepted_not_journalled": len(accepted - {t.hex() for t in answered}),
        "unfinished": len(journal.unfinished()),
    }


def _phase(records: list[TaskRecord], seconds: float) -> dict[str, Any]:
    latencies = [r.latency_ms for r in records]
    return {
        "tasks": len(records),
        "seconds": round(seconds, 3),
        "tasks_per_s": round(len(records) / seconds, 3),
        "latency_ms": figures(latencies),
        "modes": dict(Counter(r.mode for r in records)),
    }


def _crash_detection(
    kills: list[dict[str, Any]], attempts: list[tuple[Any, ...]]
) -> dict[str, Any]:
    """Crash detection, from the edge's death to the device's first reaction, and where the
    time from the kill signal goes (see ``_failover_chaos``)."""

    def of(key: str) -> dict[str, float | int | None]:
        return figures([f[key] for f in kills if f.get(key) is not None])

    return {
        "origin": "the edge's death: its shaper reading the end of its connection (the"
        " kernel closed the killed process's socket) or the process reaped, whichever first",
        "first_reaction": of("reaction_ms"),
        "first_failed_attempt": of("first_attempt_ms"),
        "session_failed": of("session_failed_ms"),
        "kills_with_a_task_in_flight": sum(f.get("first_attempt_ms") is not None for f in kills),
        "breakdown": {
            "kill_to_death": of("kill_to_death_ms"),
            "kill_to_reaped": of("kill_to_reaped_ms"),
            "kill_to_socket_closed": of("kill_to_close_ms"),
            "closes": dict(Counter(f["close"] for f in kills if f.get("close"))),
            "close_relayed_to_device": of("close_relayed_ms"),
            "device_reaction": of("device_reaction_ms"),
            "loop_stall_max": of("loop_stall_ms"),
        },
        "from_kill_signal": {
            "first_failed_attempt": of("from_kill_first_attempt_ms"),
            "session_failed": of("from_kill_session_failed_ms"),
        },
        "failed_attempt_duration_ms": figures(
            [a[2] for a in attempts if a[1] in ("failed", "refused")]
        ),
    }


def _chaos_summary(
    fleet: Fleet, baseline: dict[str, Any], records: list[TaskRecord], seconds: float,
    faults: list[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    chaos = _phase(records, seconds)
    failed_over = [r for r in records if any(a[1] != "ok" for a in r.attempts)]
    attempts = [a for r in records for a in r.attempts]
    timeouts = [a for a in attempts if a[1] == "timeout" and a[3] is not None]
    kills = [f for f in faults if f["kind"] == "kill"]
    lat_b, lat_c = baseline["latency_ms"], chaos["latency_ms"]
    return {
        "tasks": len(records),
        "lost": sum(not r.ok for r in records),
        "faults": dict(Counter(f["kind"] for f in faults)),
        "failovers": sum(a[1] != "ok" for a in attempts),
        "failover_outcomes": dict(Counter(a[1] for a in attempts if a[1] != "ok")),
        "failed_over_tasks": len(failed_over),
        "device_stats_failovers": fleet.device.stats["failovers"],
        "no_recompute_share": (
            round(sum(r.heads == 1 for r in failed_over) / len(failed_over), 4)
            if failed_over
            else None
        ),
        "head_runs_max": max(r.heads for r in records),
        "local_tail_runs": fleet.heads.finish,
        "crash_detect_ms": _crash_detection(kills, attempts),
        "hang_detect": {
            "timeout_attempt_ms": figures([a[2] for a in timeouts]),
            "adaptive_timeout_ms": figures([a[3] * 1e3 for a in timeouts if a[3]]),
            "ms_over_timeout_max": (
                round(max(a[2] / (a[3] * 1e3) for a in timeouts if a[3]), 4) if timeouts else None
            ),
        },
        "restart_s": figures([f["restart_s"] for f in kills if "restart_s" in f]),
        "reconnects_per_s_to_a_dead_edge": figures(
            [f["reconnects_per_s"] for f in kills if f.get("reconnects_per_s") is not None]
        ),
        "baseline": baseline,
        "chaos": chaos,
        "throughput_ratio": round(chaos["tasks_per_s"] / baseline["tasks_per_s"], 4),
        "latency_p50_ratio": round(lat_c["p50"] / lat_b["p50"], 4),
        "latency_p95_ratio": round(lat_c["p95"] / lat_b["p95"], 4),
        "fault_log": faults,
        "timeline": [
            [round(r.submitted_s, 3), round(r.latency_ms, 2), r.mode, len(r.attempts) - 1]
            for r in records
        ],
    }


async def _chaos_phase(
    digits: Digits, edges: list[EdgeProcess], spares: Spares, size: Size, workdir: Path
) -> dict[str, Any]:
    with DeviceJournal.open(workdir / "chaos.db") as journal:
        async with open_fleet(
            edges, digits.package, journal, slowdown=SLOWDOWN, delay_ms=DELAY_MS,
            deadline_ms=DEADLINE_MS, attempt_cap=ATTEMPT_CAP_S,
        ) as fleet:  # fmt: skip
            await stream(fleet, digits, 20, offset=0, rate=size.rate, window=size.window)
            records, seconds = await stream(
                fleet, digits, size.baseline, offset=20, rate=size.rate, window=size.window
            )
            baseline = _phase(records, seconds)
            done, submitted = asyncio.Event(), asyncio.Event()
            restarts: list[asyncio.Task[None]] = []
            refills: list[asyncio.Future[None]] = []
            loop, watching = LoopWatch(), asyncio.Event()
            watcher = asyncio.create_task(loop.run(watching))
            start = time.monotonic()
            driver = asyncio.create_task(
                drive_faults(fleet, size, start, done, submitted, restarts, spares, refills)
            )
            try:
                records, seconds = await stream(
                    fleet, digits, size.chaos, offset=20 + size.baseline, rate=size.rate,
                    window=size.window, submitted=submitted.set,
                )  # fmt: skip
            finally:
                done.set()
                faults = await driver
                await asyncio.gather(*restarts)
                await asyncio.gather(*refills)  # spares for the offline phase
            watching.set()
            await watcher
            await asyncio.sleep(ATTEMPT_CAP_S)  # late results of abandoned attempts land
            detection(fleet, faults, loop)
            summary = _chaos_summary(fleet, baseline, records, seconds, faults)
            stats = dict(fleet.device.stats)
        summary["journal"] = _journal_checks(journal, records)
    summary["duplicates"] = summary["journal"]["duplicates"]
    summary["device_stats"] = stats
    return summary


# -- entry points -------------------------------------------------------------------------


async def _run(size: Size, workdir: Path) -> dict[str, Any]:
    digits = await asyncio.to_thread(build_digits, workdir)
    devices = (DeviceIdentity(KEY).address_text, DeviceIdentity(CHILD_KEY).address_text)
    setup = time.monotonic()
    spares = Spares(digits.package_path, devices, PKI_SEED)
    loop = asyncio.get_running_loop()
    edges: list[EdgeProcess] = []
    try:
        warming = [
            loop.run_in_executor(PROCESSES, spares.add, START_TIMEOUT_S) for _ in range(SPARES)
        ]
        edges = await asyncio.to_thread(
            spawn_edges, digits.package_path, [0, 0, 0], devices=devices, timeout=START_TIMEOUT_S
        )
        await asyncio.gather(*warming)
        spawn_s = time.monotonic() - setup
        chaos = await _chaos_phase(digits, edges, spares, size, workdir)
        offline = await offline_phase(digits, edges, spares, size, workdir)
    finally:
        for e in edges:
            e.close()
        spares.close()
    on_chain = await ledger_phase(digits, size.ledger_tasks, workdir)
    moved = on_chain["reassignments"]
    return {
        "size": None,
        "setup": {"edges": len(edges), "spawn_s": round(spawn_s, 3), "spares": SPARES,
                  "cold_restarts": spares.cold, **asdict(size),
                  "slowdown": SLOWDOWN, "link_delay_ms": DELAY_MS,
                  "attempt_cap_s": ATTEMPT_CAP_S, "samples": len(digits.samples)},
        "chaos": chaos,
        "offline": offline,
        "ledger": on_chain,
        "lost": chaos["lost"] + offline["lost"] + offline["wrong"] + on_chain["lost"],
        "duplicates": chaos["duplicates"],
        "ledger_covered": moved["reassigned_attempts"] > 0 and moved["invisible"] == 0,
        "targets": TARGETS,
    }  # fmt: skip


def run(*, quick: bool, size: str = "full") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        result = asyncio.run(_run(SIZES[size], Path(tmp)))
    result["size"] = size
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"split": "tab:blue", "edge": "tab:blue", "device": "tab:green",
               "local-tail": "tab:olive"}  # fmt: skip
    spans = {"kill": "tab:red", "stop": "tab:orange", "cut": "tab:purple", "freeze": "tab:brown"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8), constrained_layout=True)
    chaos = result["chaos"]
    for kind, colour in spans.items():
        for i, f in enumerate(f for f in chaos["fault_log"] if f["kind"] == kind):
            top.axvspan(f["start_s"], max(f["end_s"], f["start_s"] + 0.05), color=colour,
                        alpha=0.15, label=f"{kind} (until back)" if i == 0 else None)  # fmt: skip
            if kind == "kill":
                top.axvline(f["start_s"], color=colour, lw=1)
    for over in (False, True):
        rows = [r for r in chaos["timeline"] if (r[3] > 0) == over]
        top.scatter(
            [r[0] for r in rows], [r[1] for r in rows], s=10 if over else 4,
            c="black" if over else [colours.get(r[2], "grey") for r in rows],
            marker="x" if over else "o", label="failed over" if over else "first try",
        )  # fmt: skip
    top.set_xlim(-0.2, chaos["chaos"]["seconds"] + 0.5)
    top.set_yscale("log")
    top.set_xlabel("s since the chaos stream started")
    top.set_ylabel("task latency (ms)")
    top.set_title(
        f"chaos: {chaos['tasks']} tasks, {chaos['lost']} lost, {chaos['duplicates']} duplicates,"
        f" {chaos['failovers']} fail-overs; p95 {chaos['chaos']['latency_ms']['p95']} ms vs"
        f" {chaos['baseline']['latency_ms']['p95']} ms without faults"
    )
    top.legend(loc="upper right", fontsize=7, ncol=3)
    offline = result["offline"]
    events = offline["timeline"]["events_s"]
    bottom.axvspan(0, events["edges_back"], color="tab:red", alpha=0.1, label="no edge")
    for name, colour in (("device_killed", "black"), ("device_ready", "tab:blue"),
                         ("resumed", "tab:green")):  # fmt: skip
        bottom.axvline(events[name], color=colour, lw=1, ls="--", label=name.replace("_", " "))
    for run_ in (1, 2):
        rows = [r for r in offline["timeline"]["tasks"] if r[3] == run_]
        bottom.scatter([r[0] for r in rows], [r[1] for r in rows], s=6,
                       c=[colours.get(r[2], "grey") for r in rows],
                       marker="o" if run_ == 1 else "^")  # fmt: skip
    bottom.set_yscale("log")
    bottom.set_xlabel("s since every edge was killed (o: first device process, ^: restarted)")
    bottom.set_ylabel("task latency (ms)")
    bottom.set_title(
        f"offline {offline['offline_s']} s and kill -9 of the device: {offline['lost']} lost;"
        f" edges back to journal synced {offline['edges_back_to_synced_s']} s"
    )
    bottom.legend(loc="upper right", fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
