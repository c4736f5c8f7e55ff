"""The device checks the edge against the ledger's registry before a single feature byte.

A real edge serves; the device is given the edge's registration as the ledger would report
it, once true and then with each field a Byzantine registry entry or a swapped edge would
change. The edge must never see an InferRequest from a refused session.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from secure_ci.device import DeviceIdentity, open_session
from secure_ci.device._connect import check_registration
from secure_ci.device._session import RECEIPT_WINDOW
from secure_ci.device._tasks import EnclaveBinding
from secure_ci.edge import (
    EdgeConfig,
    EdgeLimits,
    EdgeService,
    ModelRegistry,
    open_edge,
    tails_from_partitioner,
)
from secure_ci.exceptions import AuthorizationError, ConfigError, RemoteProtocolError
from secure_ci.ledger import RELEASE_MEASUREMENT, RELEASE_MODEL, ReleaseCache, open_ledger
from secure_ci.ledger._registry import RegisteredEdge
from secure_ci.partition import Partitioner, PartitionPlan
from secure_ci.protocol import ErrorCode
from secure_ci.testing import DEV_NOW, DevEnclave, dev_enclave
from secure_ci.zoo import get

DEVICE = DeviceIdentity(bytes(range(1, 33)))
CUT = 2


@functools.cache
def build_partitioner() -> Partitioner:
    torch.manual_seed(0)
    entry = get("digits_cnn")
    return Partitioner(entry.build(), (torch.zeros(entry.input_shape),))


def registry() -> ModelRegistry:
    models = ModelRegistry()
    for tail in tails_from_partitioner(build_partitioner(), [CUT], ["float32"]):
        models.add(tail)
    return models


@pytest.fixture
async def edge() -> AsyncIterator[tuple[EdgeService, DevEnclave]]:
    enclave = dev_enclave(DEV_NOW)
    config = EdgeConfig(
        limits=EdgeLimits(max_wait_ms=1.0), allowed_devices=frozenset({DEVICE.address})
    )
    async with open_edge(
        config, provider=enclave.provider, models=registry(), clock=lambda: float(DEV_NOW)
    ) as served:
        yield served, enclave


def _registration(served: EdgeService) -> RegisteredEdge:
    ident = served.identity
    return RegisteredEdge(
        ident.address, 1, ident.measurement, ident.quote_id, f"127.0.0.1:{served.port}", True, True
    )


def _session(served: EdgeService, enclave: DevEnclave, **kw: Any) -> Any:
    partitioner = build_partitioner()
    kw.setdefault("plan", PartitionPlan(partitioner.model_id, CUT, "float32"))
    kw.setdefault("model", partitioner.model)
    kw.setdefault("example_input", partitioner.example_inputs[0])
    return open_session(
        f"127.0.0.1:{served.port}", policy=enclave.policy, collateral=enclave.collateral,
        identity=DEVICE, clock=lambda: float(DEV_NOW), timeout=30.0, **kw,
    )  # fmt: skip


async def test_the_registered_edge_serves(edge: tuple[EdgeService, DevEnclave]) -> None:
    served, enclave = edge
    async with _session(served, enclave, registration=_registration(served)) as session:
        await session.infer(torch.randn(1, 1, 32, 32))
        assert len(session.receipts) == 1
        assert session.receipts.maxlen == RECEIPT_WINDOW  # bounded: the journal keeps them all
    assert served.stats["results"] == 1


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"active": False}, "revoked"),
        ({"measurement_allowed": False}, "not allowed"),
        ({"address": b"\x11" * 20}, "enclave key"),
        ({"measurement": b"\x22" * 32}, "measurement"),
        ({"quote_id": b"\x33" * 32}, "quote id"),
    ],
)
async def test_a_registration_that_differs_is_refused_before_any_feature(
    edge: tuple[EdgeService, DevEnclave], change: dict[str, Any], reason: str
) -> None:
    served, enclave = edge
    wrong = dataclasses.replace(_registration(served), **change)
    with pytest.raises(AuthorizationError, match=reason):
        async with _session(served, enclave, registration=wrong):
            pytest.fail("a session was opened with an edge the registry does not vouch for")
    assert served.stats["results"] == 0
    assert served.in_flight == 0


async def test_a_model_the_edge_does_not_serve_is_refused_at_the_handshake(
    edge: tuple[EdgeService, DevEnclave],
) -> None:
    served, enclave = edge
    plan = PartitionPlan("ab" * 32, CUT, "float32")
    head, _ = build_partitioner().split(CUT)  # the head alone: no model id check here
    with pytest.raises(RemoteProtocolError, match="not served") as refused:
        async with _session(served, enclave, plan=plan, model=head, example_input=None):
            pytest.fail("a session was opened for a model the edge does not serve")
    assert refused.value.code == ErrorCode.UNKNOWN_MODEL
    assert served.stats["results"] == 0


def test_check_registration_compares_every_attested_field() -> None:
    binding = EnclaveBinding(b"\x01" * 20, b"\x02" * 32, b"\x03" * 32)
    good = RegisteredEdge(b"\x01" * 20, 1, b"\x02" * 32, b"\x03" * 32, "e:1", True, True)
    check_registration(binding, good)
    with pytest.raises(AuthorizationError):
        check_registration(binding, dataclasses.replace(good, quote_id=b"\x04" * 32))


async def _refused(served: EdgeService, enclave: DevEnclave, cache: Any, state: str) -> None:
    with pytest.raises(
        AuthorizationError, match=f"not a release valid on the ledger now \\({state}"
    ):
        async with _session(served, enclave, releases=cache):
            pytest.fail("a session was opened with an edge whose release is not valid")


async def _accepted(served: EdgeService, enclave: DevEnclave, cache: Any) -> None:
    async with _session(served, enclave, releases=cache) as session:
        await session.infer(torch.randn(1, 1, 32, 32))


async def test_the_device_enforces_the_release_registry(
    edge: tuple[EdgeService, DevEnclave],
) -> None:
    """Not yet valid, valid, suspended (from the next refresh on), lifted, expired."""
    served, enclave = edge
    m = served.identity.measurement
    async with open_ledger("inprocess") as ledger:
        owner = ledger.owner
        eager = ReleaseCache(ledger, max_age_blocks=0, head_ttl=0)
        await _refused(served, enclave, eager, "unknown")
        now = await ledger.timestamp()
        proposed = await ledger.propose_release(
            owner, RELEASE_MEASUREMENT, m, now + 1000, now + 2000
        )
        await ledger.execute(owner, proposed.proposal_id)
        await _refused(served, enclave, eager, "not-yet-valid")
        await ledger.advance_time(1000)
        await _accepted(served, enclave, eager)
        lazy = ReleaseCache(ledger, max_age_blocks=1000, head_ttl=0)
        await lazy.view()
        await ledger.suspend(owner, RELEASE_MEASUREMENT, m)
        await _refused(served, enclave, eager, "suspended")
        await _accepted(served, enclave, lazy)  # its view is not due for a refresh yet
        await lazy.refresh()
        await _refused(served, enclave, lazy, "suspended")
        lift = await ledger.propose_lift(owner, RELEASE_MEASUREMENT, m)
        await ledger.execute(owner, lift.proposal_id)
        await _accepted(served, enclave, eager)
        await ledger.advance_time(1000)
        await _refused(served, enclave, eager, "expired")
        assert eager.refreshes >= 6
    assert served.stats["results"] == 3


async def test_a_release_view_refreshes_incrementally() -> None:
    async with open_ledger("inprocess") as ledger:
        clock = [0.0]
        cache = ReleaseCache(ledger, max_age_blocks=2, head_ttl=1.0, monotonic=lambda: clock[0])
        first = await cache.view()
        assert first.releases == {}
        await ledger.allow_measurement(b"\x05" * 32)  # propose + execute: two blocks
        clock[0] = 5.0
        assert await cache.view() is first  # at most two blocks old: no refresh
        await ledger.allow_measurement(b"\x06" * 32)
        clock[0] = 5.5
        assert await cache.view() is first  # the head is not asked again within head_ttl
        clock[0] = 6.0
        view = await cache.view()
        assert view is not first
        assert view.state(RELEASE_MEASUREMENT, b"\x05" * 32) == "valid"
        assert view.state(RELEASE_MEASUREMENT, b"\x06" * 32) == "valid"
        assert view.state(RELEASE_MODEL, b"\x05" * 32) == "unknown"
    with pytest.raises(ConfigError):
        ReleaseCache(ledger, max_age_blocks=-1)
    with pytest.raises(ConfigError):
        ReleaseCache(ledger, head_ttl=-1)
