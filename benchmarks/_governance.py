"""Ledger benchmark part: gas of each governance step, and what the release check adds to a
device's connect.

``gas``: one proposal of each kind through a 2-of-2 deployment (the second party approves,
then anyone executes): ``propose_release``, ``approve``, ``execute_release``, ``suspend``,
``propose_lift``, ``execute_lift``, ``propose_party``, ``execute_party``, and ``lift`` (the
whole lift: propose + approve + execute).
``connect``: a device opens attested sessions to a development edge on loopback, alternately
without and with the release check (a warm :class:`ReleaseCache` with its default
``head_ttl``: a dictionary lookup, and a block-number query against the node at most once a
second). ``added_p50_ms`` is the median of the paired differences (pairs alternate which goes
first), ``ratio`` the p50 with the check over the p50 without. ``check_ms`` times the check
alone (``cache.view()`` + ``require_valid``) back to back; ``head_query_ms`` is the
block-number round trip that a check pays once per ``head_ttl``. On anvil when it is
installed (a JSON-RPC round trip over HTTP, as a real device pays it), else in-process.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from eth_account import Account

from secure_ci.device import DeviceIdentity, open_session
from secure_ci.edge import EdgeConfig, EdgeLimits, ModelRegistry, open_edge, tails_from_partitioner
from secure_ci.ledger import (
    RELEASE_MEASUREMENT,
    GovernanceSettings,
    LedgerClient,
    ReleaseCache,
    find_anvil,
    open_ledger,
    run_anvil,
)
from secure_ci.ledger._records import keccak256
from secure_ci.partition import Partitioner, PartitionPlan
from secure_ci.testing import DEV_NOW, dev_enclave
from secure_ci.zoo import get

__all__ = ["CONNECT_TARGET_MS", "SESSIONS", "governance_figures"]

CONNECT_TARGET_MS = 5.0
SESSIONS = {"smoke": 4, "quick": 20, "full": 50}  # paired connects (without, with the check)
CUT = 2


@contextlib.asynccontextmanager
async def _backend() -> AsyncIterator[tuple[str, str]]:
    if find_anvil() is None:
        yield "inprocess", "inprocess"
        return
    with run_anvil() as node:
        yield node.url, "anvil"


async def _gas(ledger: LedgerClient, second: Any) -> dict[str, int]:
    owner = ledger.owner
    m = keccak256(b"bench release")
    now = await ledger.timestamp()
    gas: dict[str, int] = {}
    proposed = await ledger.propose_release(owner, RELEASE_MEASUREMENT, m, now, now + 604_800)
    gas["propose_release"] = proposed.gas_used
    gas["approve"] = (await ledger.approve(second, proposed.proposal_id)).gas_used
    gas["execute_release"] = (await ledger.execute(owner, proposed.proposal_id)).gas_used
    gas["suspend"] = (await ledger.suspend(second, RELEASE_MEASUREMENT, m)).gas_used
    lift = await ledger.propose_lift(owner, RELEASE_MEASUREMENT, m)
    gas["propose_lift"] = lift.gas_used
    approved = (await ledger.approve(second, lift.proposal_id)).gas_used
    gas["execute_lift"] = (await ledger.execute(owner, lift.proposal_id)).gas_used
    gas["lift"] = gas["propose_lift"] + approved + gas["execute_lift"]
    party = await ledger.propose_party(owner, Account.create().address)
    gas["propose_party"] = party.gas_used
    await ledger.approve(second, party.proposal_id)
    gas["execute_party"] = (await ledger.execute(owner, party.proposal_id)).gas_used
    return gas


def _pct(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    return {"p50": statistics.median(times), "p95": times[int(0.95 * (len(times) - 1))]}


async def _release(ledger: LedgerClient, second: Any, m: bytes) -> None:
    now = await ledger.timestamp()
    proposed = await ledger.propose_release(
        ledger.owner, RELEASE_MEASUREMENT, m, now, now + 604_800
    )
    await ledger.approve(second, proposed.proposal_id)
    await ledger.execute(ledger.owner, proposed.proposal_id)


async def _connect(ledger: LedgerClient, second: Any, sessions: int) -> dict[str, Any]:
    torch.manual_seed(0)
    entry = get("digits_cnn")
    partitioner = Partitioner(entry.build(), (torch.zeros(entry.input_shape),))
    head, _ = partitioner.split(CUT)
    plan = PartitionPlan(partitioner.model_id, CUT, "float32")
    models = ModelRegistry()
    for tail in tails_from_partitioner(partitioner, [CUT], ["float32"]):
        models.add(tail)
    device = DeviceIdentity(bytes(range(1, 33)))
    enclave = dev_enclave(DEV_NOW)
    config = EdgeConfig(
        limits=EdgeLimits(max_wait_ms=1.0), allowed_devices=frozenset({device.address})
    )
    async with open_edge(
        config, provider=enclave.provider, models=models, clock=lambda: float(DEV_NOW)
    ) as served:
        await _release(ledger, second, served.identity.measurement)
        cache = ReleaseCache(ledger)
        await cache.view()  # warm

        async def connect(releases: ReleaseCache | None) -> float:
            start = time.perf_counter()
            async with open_session(
                f"127.0.0.1:{served.port}", policy=enclave.policy, collateral=enclave.collateral,
                identity=device, model=head, plan=plan, clock=lambda: float(DEV_NOW),
                releases=releases,
            ):  # fmt: skip
                elapsed = time.perf_counter() - start
            return elapsed * 1000

        await connect(None)  # warm: TLS contexts, collateral parsing
        without: list[float] = []
        with_check: list[float] = []
        for i in range(sessions):  # alternate which goes first: the edge is still closing
            if i % 2:  # the previous session while the next one connects
                with_check.append(await connect(cache))
                without.append(await connect(None))
            else:
                without.append(await connect(None))
                with_check.append(await connect(cache))
        checks = []
        for _ in range(10 * sessions):
            start = time.perf_counter()
            view = await cache.view()
            view.require_valid(RELEASE_MEASUREMENT, served.identity.measurement)
            checks.append((time.perf_counter() - start) * 1000)
        heads = []
        for _ in range(sessions):
            start = time.perf_counter()
            await ledger.block_number()
            heads.append((time.perf_counter() - start) * 1000)
    base, checked = _pct(without), _pct(with_check)
    return {
        "sessions": sessions,
        "baseline_ms": base,
        "with_release_check_ms": checked,
        "added_p50_ms": statistics.median(b - a for a, b in zip(without, with_check, strict=True)),
        "ratio": checked["p50"] / base["p50"],
        "check_ms": _pct(checks),
        "head_query_ms": _pct(heads),
        "target_added_ms": CONNECT_TARGET_MS,
    }


async def governance_figures(size: str) -> dict[str, Any]:
    """Gas per governance step and the connect time the release check adds."""
    second = Account.create()
    async with _backend() as (url, name):
        settings = GovernanceSettings((second.address,), 2, 0)
        async with open_ledger(url, governance=settings) as ledger:
            await ledger.fund(second.address, 10**19)
            gas = await _gas(ledger, second)
            connect = await _connect(ledger, second, SESSIONS[size])
    return {"backend": name, "threshold": "2 of 2", "gas": gas, "connect": connect}
