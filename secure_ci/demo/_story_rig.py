"""The planner story's rig: two attested edges, each behind a shaped link, on one chain.

Each edge has its own enclave identity, journal and anchorer, is registered on the chain
and serves every batchable cut of the model package (and the whole model, for edge-only)
over attested TLS 1.3. A :class:`~secure_ci.testing.LinkShaper` sits in front of each: the
device only ever connects to the shapers' ports, so the link can step and the edge can be
killed under it. :meth:`StoryEdge.kill` is a crash as the device sees it: every connection
is reset at once (bytes still on the wire are lost with them), new ones are refused, and the
edge stops serving; what its journal holds is anchored from disk (what a restart with
``edge serve --anchor-only`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account

from secure_ci.attestation import DevPKI, Policy, SimulatedProvider
from secure_ci.device import DeviceIdentity, TaskReceipt
from secure_ci.edge import (
    EdgeConfig,
    EdgeService,
    EnclaveIdentity,
    ModelRegistry,
    ModelSpec,
    create_identity,
    load_model_tails,
    open_edge,
)
from secure_ci.exceptions import SecureCIError
from secure_ci.ledger import Anchorer, AuditIndex, Journal
from secure_ci.testing import Link, LinkShaper, open_link_shaper

__all__ = ["AUDIT_INDEX", "StoryEdge", "StoryWorld", "audit_edges", "open_story_world"]

ETHER = 10**18
AUDIT_INDEX = "story-audit.sqlite"
KILL_WAIT_SECONDS = 2.0
"""How long a kill waits for a request to be at the edge (so that it is lost mid-task)."""


@dataclass
class StoryEdge:
    """One running edge, its shaper in front, and what it anchors."""

    name: str
    identity: EnclaveIdentity
    journal: Journal
    anchorer: Anchorer
    shaper: LinkShaper
    service: EdgeService
    stop: asyncio.Event
    served: asyncio.Task[None]
    killed_at: float | None = None

    @property
    def address(self) -> str:
        """Where devices connect: the shaper's port."""
        return self.shaper.address

    async def kill(self) -> bool:
        """Crash the edge while a request is at it (waits up to ``KILL_WAIT_SECONDS`` for
        one); True when one was."""
        loop = asyncio.get_running_loop()
        until = loop.time() + KILL_WAIT_SECONDS
        # the edge counts its requests in flight but has no event for "one arrived": poll
        while self.service.in_flight == 0 and loop.time() < until:  # noqa: ASYNC110
            await asyncio.sleep(0.0005)
        mid_task = self.service.in_flight > 0
        self.shaper.cut("refuse")  # every connection reset now, new ones refused
        self.killed_at = loop.time()
        self.stop.set()
        await asyncio.wait({self.served})
        return mid_task


@dataclass
class StoryWorld:
    """The chain, the attestation roots devices trust, the edges and the devices."""

    ledger: Any
    pki: DevPKI
    policy: Policy
    edges: list[StoryEdge]
    devices: list[DeviceIdentity]

    def shape(self, link: Link) -> None:
        """The device's link to every edge steps (both directions)."""
        for edge in self.edges:
            if not edge.shaper.is_cut:
                edge.shaper.shape(uplink=link, downlink=link)

    async def anchor(self) -> None:
        """Every edge anchors what its journal holds (the killed one from its disk)."""
        for edge in self.edges:
            await edge.anchorer.flush()


@contextlib.asynccontextmanager
async def open_story_world(
    ledger: Any,
    workdir: Path,
    package: Path,
    model_id: bytes,
    *,
    edges: int,
    devices: int,
    link: Link,
    now: int,
    mrenclave: bytes,
    mrsigner: bytes,
) -> AsyncIterator[StoryWorld]:
    """Register ``edges`` edges and ``devices`` devices on ``ledger`` and run the edges."""
    pki = DevPKI.generate(now)
    provider = SimulatedProvider(pki, mrenclave=mrenclave, mrsigner=mrsigner)
    policy = Policy(roots=(pki.root_der,), mrenclave=frozenset({mrenclave}))
    identities = [await asyncio.to_thread(create_identity, provider, now=now) for _ in range(edges)]
    cameras = [DeviceIdentity.generate() for _ in range(devices)]
    operator, fleet = Account.create(), Account.create()
    accounts = [Account.from_key(i.signing_key) for i in identities]
    for account in (operator, fleet, *accounts):
        await ledger.fund(account.address, ETHER)
    edge_party = await ledger.register_party(operator.address)
    fleet_party = await ledger.register_party(fleet.address)
    for identity, account in zip(identities, accounts, strict=True):
        await ledger.allow_measurement(identity.measurement)
        await ledger.register_edge(
            operator, edge_party, account, identity.measurement, identity.quote_id,
            "127.0.0.1",
        )  # fmt: skip
    await ledger.register_model(fleet, fleet_party, model_id)
    for camera in cameras:
        await ledger.register_device(fleet, fleet_party, camera)
        await ledger.fund(camera.address_text, ETHER)  # a camera pays for its challenges
    allowed = frozenset(
        [c.address for c in cameras if await ledger.is_registered_device(c.address_text)]
    )
    tails = await asyncio.to_thread(load_model_tails, ModelSpec(package=package))
    config = EdgeConfig(
        host="127.0.0.1", provider="simulated", chain_id=ledger.chain_id,
        contract=bytes.fromhex(ledger.address[2:]),
    )  # fmt: skip
    world = StoryWorld(ledger, pki, policy, [], cameras)
    async with contextlib.AsyncExitStack() as stack:
        for k, (identity, account) in enumerate(zip(identities, accounts, strict=True)):
            models = ModelRegistry()
            for tail in tails:
                models.add(tail)
            journal = Journal.open(workdir / f"edge-{k}.sqlite", edge=identity.address)
            stack.callback(journal.close)
            up: asyncio.Future[EdgeService] = asyncio.get_running_loop().create_future()
            stop = asyncio.Event()
            served = asyncio.create_task(
                _serve(config, provider, models, allowed, journal, identity, up, stop)
            )
            stack.push_async_callback(_stopped, stop, served)
            service = await up
            shaper = await stack.enter_async_context(
                open_link_shaper(service.port, uplink=link, downlink=link)
            )
            # anchored after the stream: the in-process chain's transactions would otherwise
            # take the CPU from the device and the edges while latencies are measured
            anchorer = Anchorer(journal, ledger, account, max_records=64)
            name = f"edge-{chr(ord('a') + k)}"
            world.edges.append(
                StoryEdge(name, identity, journal, anchorer, shaper, service, stop, served)
            )
        yield world


async def _serve(
    config: EdgeConfig,
    provider: SimulatedProvider,
    models: ModelRegistry,
    allowed: frozenset[bytes],
    journal: Journal,
    identity: EnclaveIdentity,
    up: asyncio.Future[EdgeService],
    stop: asyncio.Event,
) -> None:
    try:
        async with open_edge(
            config, provider=provider, models=models, allowed_devices=allowed,
            journal=journal, identity=identity,
        ) as service:  # fmt: skip
            up.set_result(service)
            await stop.wait()
    except BaseException as exc:
        if not up.done():
            up.set_exception(exc)
        raise


async def _stopped(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    with contextlib.suppress(SecureCIError):
        await task


async def audit_edges(
    workdir: Path, ledger: Any, edges: Sequence[StoryEdge], receipts: Sequence[TaskReceipt]
) -> dict[str, Any]:
    """Index every anchored task of ``edges`` from the chain's calldata and verify each; and
    find each device receipt (each task an edge answered) among the verified records."""
    addresses = ["0x" + e.identity.address.hex() for e in edges]
    with AuditIndex(workdir / AUDIT_INDEX, ledger.domain) as index:
        await index.sync(ledger, addresses)
        tasks = index.tasks(limit=1_000_000)
        findings, verified = 0, set()
        for task in tasks:
            checked = await index.verify_task(task, ledger)
            findings += len(checked.findings)
            verified.add((task.edge, task.record.result.struct_hash()))
        findings += len(index.batch_findings())
        recorded = batches = 0
        for address in addresses:
            state = await ledger.edge_state(address)
            recorded += int(state.next_seq)
            batches += int(state.next_batch_id)
    audited = sum((r.request.edge, r.result.struct_hash()) in verified for r in receipts)
    return {
        "tasks_recorded": recorded,
        "tasks_anchored": len(tasks),
        "tasks_verified": len(tasks),
        "findings": findings,
        "batches": batches,
        "receipts": len(receipts),
        "receipts_audited": audited,
        "contract": ledger.address,
        "chain_id": ledger.chain_id,
    }
