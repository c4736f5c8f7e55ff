"""The failover benchmark's ledger phase: every reassignment visible on the chain.

Three edges in this process (the demo story's rig: each with its enclave identity, journal
and anchorer on an in-process chain, behind a link shaper), a fleet device streaming digits
with a journal, and two edges killed in turn while a request is at them (every connection
reset, new ones refused, as a crash looks to the device). Afterwards each edge anchors what
its journal holds (the killed ones from disk) and every attempt the device sent to an edge
and then took elsewhere is looked for on the chain: anchored by that edge, or challenged
there with the device's signed request once overdue (:mod:`secure_ci.demo._story_ledger`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from _failover_rig import Digits

from secure_ci.demo._story_ledger import reassignments_on_ledger
from secure_ci.demo._story_rig import AUDIT_INDEX, audit_edges, open_story_world
from secure_ci.demo._system import DEMO_MRENCLAVE, DEMO_MRSIGNER
from secure_ci.device import TaskOutcome, open_device
from secure_ci.device._journal import DeviceJournal
from secure_ci.ledger import open_ledger
from secure_ci.testing import Link

__all__ = ["ledger_phase"]

SLOWDOWN = 100.0  # a slow device (x the profile) offloads: the tasks go to the edges
WINDOW = 4
AUDITED = ("tasks_anchored", "tasks_verified", "findings", "receipts", "receipts_audited")


async def ledger_phase(digits: Digits, tasks: int, workdir: Path) -> dict[str, Any]:
    """Stream ``tasks`` digits over three edges on a chain, killing two of them in turn."""
    async with (
        open_ledger("inprocess") as ledger,
        open_story_world(
            ledger, workdir, digits.package_path, digits.package.model_id, edges=3, devices=1,
            link=Link(None, 1.0), now=int(time.time()), mrenclave=DEMO_MRENCLAVE,
            mrsigner=DEMO_MRSIGNER,
        ) as world,
    ):  # fmt: skip
        outcomes: list[TaskOutcome] = []
        killed: list[dict[str, Any]] = []
        by_address = {e.address: e for e in world.edges}
        with DeviceJournal.open(workdir / "ledger-device.db") as journal:
            async with open_device(
                [e.address for e in world.edges], package=digits.package,
                identity=world.devices[0], policy=world.policy,
                collateral=world.pki.collateral, journal=journal, domain=ledger.domain,
                slowdown=SLOWDOWN, early_exits=False,
            ) as device:  # fmt: skip
                await device.wait_ready()
                window = asyncio.Semaphore(WINDOW)

                async def one(i: int) -> None:
                    async with window:
                        x = digits.samples[i % len(digits.samples)].unsqueeze(0)
                        outcomes.append(await device.run(x))

                async def kill_at(done: int) -> None:
                    while len(outcomes) < done:  # noqa: ASYNC110 - the stream's progress
                        await asyncio.sleep(0.005)
                    alive = [e for e in world.edges if not e.shaper.is_cut]
                    current = device.planner.current
                    victim = by_address.get(current.edge or "") if current else None
                    victim = victim if victim in alive else alive[0]
                    mid_task = await victim.kill()
                    killed.append({"edge": victim.name, "mid_task": mid_task})

                killers = [asyncio.create_task(kill_at(tasks * k // 3)) for k in (1, 2)]
                await asyncio.gather(*(one(i) for i in range(tasks)))
                await asyncio.gather(*killers)
            unfinished = len(journal.unfinished())
        await world.anchor()
        audit = await audit_edges(workdir, ledger, world.edges, [
            o.receipt for o in outcomes if o.receipt is not None
        ])  # fmt: skip
        with DeviceJournal.open(workdir / "ledger-device.db") as journal:
            moved = await reassignments_on_ledger(
                ledger, workdir / AUDIT_INDEX,
                {e.address: e.identity.address for e in world.edges},
                [o for o in outcomes if o.failovers], journal, world.devices[0],
            )  # fmt: skip
    return {
        "tasks": len(outcomes),
        "killed": killed,
        "failed_over_tasks": sum(o.failovers > 0 for o in outcomes),
        "modes": {m: sum(o.mode == m for o in outcomes) for m in {o.mode for o in outcomes}},
        "lost": tasks - len(outcomes) + unfinished,
        "audit": {k: audit[k] for k in AUDITED},
        "reassignments": moved,
    }
