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
from secure_ci.exceptions import AuthorizationError, RemoteProtocolError
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
