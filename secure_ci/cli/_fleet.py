"""``device infer --plan``: every input planned over the registered edges, with fail-over."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    import torch

    from secure_ci.attestation import Collateral, Policy
    from secure_ci.device import DeviceIdentity, TaskOutcome
    from secure_ci.device._journal import DeviceJournal
    from secure_ci.ledger._records import LedgerDomain
    from secure_ci.ledger._registry import RegisteredEdge
    from secure_ci.package import ModelPackage

__all__ = ["infer_planned"]


async def infer_planned(
    edges: Sequence[str | RegisteredEdge],
    *,
    package: ModelPackage,
    policy: Policy,
    collateral: Collateral,
    identity: DeviceIdentity,
    samples: list[tuple[str, torch.Tensor]],
    domain: LedgerDomain,
    journal: DeviceJournal,
    deadline_ms: float,
    connect_timeout: float,
    clock: Callable[[], float],
    echo: Callable[[str], None] = typer.echo,
) -> int:
    """Run ``samples`` through a fleet device; print one JSON line each, in input order,
    once its outcome is journalled. Tasks a previous run left unfinished run first."""
    import json

    from secure_ci.device import open_device

    async with open_device(
        edges, package=package, identity=identity, policy=policy, collateral=collateral,
        journal=journal, domain=domain, deadline_ms=deadline_ms,
        connect_timeout=connect_timeout, clock=clock,
    ) as device:  # fmt: skip
        await device.wait_ready(connect_timeout)
        for outcome in await device.resume():
            echo(json.dumps(_line(f"resumed task {outcome.key}", outcome)))
        window = asyncio.Semaphore(8)

        async def one(x: torch.Tensor) -> TaskOutcome:
            async with window:
                return await device.run(x)

        jobs = [asyncio.create_task(one(x)) for _, x in samples]
        try:
            for (name, _), job in zip(samples, jobs, strict=True):
                echo(json.dumps(_line(name, await job)))
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
        stats = dict(device.stats)
    typer.echo(
        f"{stats.get('tasks', 0)} tasks: {stats.get('split', 0)} split, "
        f"{stats.get('edge', 0)} edge-only, {stats.get('device', 0)} on the device, "
        f"{stats.get('local-tail', 0)} finished here after every edge failed; "
        f"{stats.get('failovers', 0)} fail-overs, {stats.get('plan_switches', 0)} plan switches",
        err=True,
    )
    return len(jobs)


def _line(name: str, outcome: TaskOutcome) -> dict[str, Any]:
    output = outcome.output if not isinstance(outcome.output, tuple) else outcome.output[0]
    flat = output.flatten()
    receipt = outcome.receipt
    return {
        "input": name,
        "mode": outcome.mode,
        "where": str(outcome.configuration),
        "edge": outcome.edge,
        "task_id": None if receipt is None else "0x" + receipt.request.task_id.hex(),
        "attempts": [[a.edge, a.outcome] for a in outcome.attempts],
        "latency_ms": round(outcome.latency_ms, 3),
        "argmax": int(flat.argmax()),
        "output": [round(float(v), 6) for v in flat],
    }
