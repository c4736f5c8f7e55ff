"""Ledger benchmark part: gas of a dispute that opens k output commitments.

``dispute_gas``: one task a device sent to k edges, each result filed with the opening of its
output commitment (``LedgerClient.dispute``): ``k2`` two edges that disagree (no strict
majority: recorded without a dissenter), ``k3`` three edges of which one disagrees (recorded
with one dissent), ``k8`` eight edges with two dissenters (the contract's maximum). Each is
a fresh task on a fresh set of registered edges, so every figure includes the dispute's first
writes (dispute record, duplicate guard, dissent counters).
"""

from __future__ import annotations

from typing import Any

from secure_ci.ledger import open_ledger
from secure_ci.testing import ledger_world

__all__ = ["dispute_gas"]

CASES = {
    "k2": (b"cat", b"dog"),
    "k3": (b"cat", b"dog", b"cat"),
    "k8": (b"cat", b"dog", b"cat", b"cat", b"fish", b"cat", b"cat", b"cat"),
}


async def dispute_gas(backend: str) -> dict[str, Any]:
    """Gas of a k-way dispute on ``backend`` (see the module docstring)."""
    async with open_ledger(backend) as ledger:
        world = await ledger_world(ledger, edges=8, devices=1, seed=91)
        gas: dict[str, Any] = {}
        for name, outputs in CASES.items():
            evidence = world.redundant(
                world.edges[: len(outputs)], task=name.encode(), outputs=outputs
            )
            dispute_id, gas[name] = await ledger.dispute_gas(world.devices[0], evidence)
            info = await ledger.dispute_info(dispute_id)
            gas[f"{name}_dissenters"] = info.dissenters
    return gas
