"""``open_device``: a fleet :class:`~secure_ci.device.Device` with its sessions kept up."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager

from secure_ci.attestation import Collateral, Policy
from secure_ci.device._breaker import Breaker
from secure_ci.device._connect import open_session
from secure_ci.device._edges import EdgeLink
from secure_ci.device._fleet import Device
from secure_ci.device._identity import DeviceIdentity
from secure_ci.device._journal import DeviceJournal
from secure_ci.device._local import LocalModel
from secure_ci.device._reconcile import Reconciled, keep_reconciled
from secure_ci.device._session import DEFAULT_DOMAIN, Session
from secure_ci.exceptions import AuthorizationError, ConfigError
from secure_ci.ledger import Deployment, LedgerClient, ReleaseCache, open_ledger
from secure_ci.ledger._records import LedgerDomain
from secure_ci.ledger._registry import RegisteredEdge
from secure_ci.package import ModelPackage
from secure_ci.partition import PartitionPlan
from secure_ci.plan import Planner

__all__ = ["open_device"]


@contextlib.asynccontextmanager
async def open_device(
    edges: Sequence[str | RegisteredEdge] | Deployment,
    *,
    package: ModelPackage,
    identity: DeviceIdentity,
    policy: Policy,
    collateral: Collateral,
    journal: DeviceJournal | None = None,
    domain: LedgerDomain = DEFAULT_DOMAIN,
    cuts: Sequence[int] | None = None,
    codecs: Sequence[str] = ("float32", "float16", "int8"),
    edge_only: bool = True,
    early_exits: bool = True,
    accuracy_budget: float = 1.0,
    deadline_ms: float = math.inf,
    margin: float = 0.1,
    patience: int = 3,
    jump: float = 0.5,
    slowdown: float = 1.0,
    attempt_floor: float = 1.0,
    probe_interval: float | None = 1.0,
    attempt_cap: float = 10.0,
    connect_timeout: float = 30.0,
    breaker: Callable[[], Breaker] = Breaker,
    ledger: LedgerClient | None = None,
    reconcile_interval: float = 30.0,
    grace: int = 60,
    releases: ReleaseCache | None = None,
    clock: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> AsyncIterator[Device]:
    """A :class:`Device` over ``edges`` (``HOST:PORT``, or registry entries from the ledger,
    which sessions then check), running ``package``'s model.

    Given a :class:`~secure_ci.ledger.Deployment` instead, the device reads the registry
    itself: every active edge with an allowed measurement (AuthorizationError if none), each
    session checked against its registration and against the release registry (a cached
    view, refreshed as :class:`~secure_ci.ledger.ReleaseCache` says) before a feature byte
    is sent; the deployment's chain is then the ``ledger`` and its domain the ``domain``.

    The planner chooses among the package's batchable ``cuts`` (or those given), ``codecs``,
    edge-only (the edge must serve the whole model, as edges do for packages), device-only
    and the package's calibrated early exits (unless ``early_exits`` is False: then every
    output is the whole model's), under ``accuracy_budget`` points and ``deadline_ms``, with
    the planner's hysteresis (``margin``, ``patience``, ``jump``: see
    :class:`~secure_ci.plan.Planner`). ``slowdown`` emulates a slower device (its head and
    local runs take that many times what the package's profile says: steadily, so a 100x
    device does not swing by a hundred times this host's hiccups). An attempt waits for its
    result twice the predicted time plus four deviations, within [``attempt_floor``,
    ``attempt_cap``] seconds. Sessions connect in the background and reconnect when their
    breaker lets them; until one is up, tasks run on the device. An edge that completed no task for
    ``probe_interval`` seconds is pinged (every other ping padded), so its estimates follow
    its link while the plan does not use it.

    With a ``ledger`` (of ``domain``) and a ``journal``, the journal is reconciled with the
    chain every ``reconcile_interval`` seconds in the background, whenever the chain
    answers: results looked up, tasks overdue by ``grace`` seconds and requests that got no
    result challenged (``device.stats["reconciled"]`` counts the passes).
    """
    if isinstance(edges, Deployment):
        async with _from_chain(edges, ledger) as (chain, found, releases), open_device(
            found, package=package, identity=identity, policy=policy,
            collateral=collateral, journal=journal, domain=edges.domain, cuts=cuts,
            codecs=codecs, edge_only=edge_only, early_exits=early_exits,
            accuracy_budget=accuracy_budget, deadline_ms=deadline_ms, margin=margin,
            patience=patience, jump=jump, slowdown=slowdown, attempt_floor=attempt_floor,
            probe_interval=probe_interval, attempt_cap=attempt_cap,
            connect_timeout=connect_timeout, breaker=breaker,
            ledger=chain if journal is not None else None,
            reconcile_interval=reconcile_interval, grace=grace, clock=clock,
            monotonic=monotonic, random_bytes=random_bytes, releases=releases,
        ) as device:  # fmt: skip
            yield device
        return
    if ledger is not None and journal is None:
        raise ConfigError("reconciling with a ledger needs a journal")
    local = await asyncio.to_thread(LocalModel, package, cuts=cuts, exits=early_exits)
    costs = await asyncio.to_thread(local.costs, codecs, edge_only=edge_only)
    links: dict[str, EdgeLink] = {}
    for e in edges:
        name = e if isinstance(e, str) else e.endpoint
        links[name] = EdgeLink(name, None if isinstance(e, str) else e, breaker())
    planner = Planner(
        costs, list(links), accuracy_budget=accuracy_budget, margin=margin,
        patience=patience, jump=jump,
    )  # fmt: skip
    device = Device(
        local, planner, links, journal=journal, deadline_ms=deadline_ms, slowdown=slowdown,
        attempt_floor=attempt_floor, attempt_cap=attempt_cap, clock=clock,
        monotonic=monotonic, random_bytes=random_bytes,
    )  # fmt: skip
    await device.calibrate()
    plan = PartitionPlan(package.model_id_hex, local.cuts[0], codecs[0])
    closing = asyncio.Event()

    def connect(index: int, edge: EdgeLink) -> AbstractAsyncContextManager[Session]:
        return open_session(
            edge.name, policy=policy, collateral=collateral, identity=identity,
            model=local.head(plan.cut), plan=plan, ledger_domain=domain,
            timeout=connect_timeout, clock=clock, monotonic=monotonic,
            random_bytes=random_bytes, registration=edge.registration, releases=releases,
            first_seq=int(clock() * 1e6) + (index << 40), canonical=package.canonical,
        )  # fmt: skip

    # Not a TaskGroup: an error in the caller's block must reach it as itself, not wrapped.
    keepers = [
        asyncio.create_task(
            e.keep(
                functools.partial(connect, i, e),
                closing,
                monotonic,
                probe_interval,
                on_end=device.keep_evidence,
            )
        )
        for i, e in enumerate(links.values())
    ]
    reconciler = None
    if ledger is not None and journal is not None:

        def passed(done: Reconciled) -> None:
            device.stats["reconciled"] += 1

        reconcile = keep_reconciled(
            journal, ledger, identity, domain=domain, interval=reconcile_interval,
            grace=grace, on_pass=passed,
        )  # fmt: skip
        reconciler = asyncio.create_task(reconcile)
    try:
        yield device
    finally:
        closing.set()
        if reconciler is not None:
            reconciler.cancel()
            await asyncio.gather(reconciler, return_exceptions=True)
        if keepers:
            await asyncio.wait(keepers, timeout=connect_timeout)
        for k in keepers:
            k.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        await device.flush_evidence()  # the journal outlives the device: every row is in


@contextlib.asynccontextmanager
async def _from_chain(
    deployment: Deployment, ledger: LedgerClient | None
) -> AsyncIterator[tuple[LedgerClient, list[RegisteredEdge], ReleaseCache]]:
    """The deployment's ledger (``ledger`` if given), its usable edges (most recently
    registered first) and a release cache from the deployment block."""
    async with contextlib.AsyncExitStack() as stack:
        if ledger is None:
            ledger = await stack.enter_async_context(
                open_ledger(deployment.rpc, contract_address=deployment.contract_text)
            )
        if ledger.chain_id != deployment.chain_id:
            raise ConfigError(f"the node runs chain {ledger.chain_id}, not the deployment's")
        found = [e for e in await ledger.registered_edges() if e.usable][::-1]
        if not found:
            raise AuthorizationError("no edge on the ledger is active with an allowed measurement")
        yield ledger, found, ReleaseCache(ledger, first_block=deployment.deployment_block)
