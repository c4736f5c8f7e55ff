"""The device client against a real in-process edge: real TLS 1.3, simulated enclave."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from secure_ci.device import DeviceIdentity, Session, open_session
from secure_ci.edge import EdgeConfig, EdgeLimits, ModelRegistry
from secure_ci.edge._identity import MemoryJournal
from secure_ci.edge._models import load_zoo_tails
from secure_ci.edge._service import EdgeService, open_edge
from secure_ci.exceptions import MeasurementError, PartitionError, RemoteProtocolError
from secure_ci.ledger import task_id_for
from secure_ci.partition import Partitioner, PartitionPlan
from secure_ci.protocol import ErrorCode
from secure_ci.testing import DEV_NOW, DevEnclave, dev_enclave
from secure_ci.zoo import get

CUT = 2
CODECS = ("float32", "int8")


@dataclass
class Setup:
    edge: EdgeService
    enclave: DevEnclave
    identity: DeviceIdentity
    journal: MemoryJournal
    partitioner: Partitioner
    cut: int = CUT

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.edge.port}"

    def plan(self, codec: str = "int8") -> PartitionPlan:
        return PartitionPlan(self.partitioner.model_id, self.cut, codec)


@pytest.fixture(scope="module")
def partitioner() -> Partitioner:
    entry = get("digits_cnn")
    torch.manual_seed(0)  # the same weights as load_zoo_tails(seed=0) on the edge
    return Partitioner(entry.build(), (torch.zeros(entry.input_shape),))


@pytest.fixture
async def setup(partitioner: Partitioner) -> AsyncIterator[Setup]:
    enclave = dev_enclave(DEV_NOW)
    identity = DeviceIdentity.generate()
    journal = MemoryJournal()
    models = ModelRegistry()
    for tail in load_zoo_tails("digits_cnn", [CUT], CODECS, seed=0):
        models.add(tail)
    config = EdgeConfig(
        limits=EdgeLimits(max_wait_ms=1.0), allowed_devices=frozenset({identity.address})
    )
    async with open_edge(
        config,
        provider=enclave.provider,
        models=models,
        journal=journal,
        clock=lambda: float(DEV_NOW),
    ) as edge:
        yield Setup(edge, enclave, identity, journal, partitioner)


def _session(setup: Setup, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "policy": setup.enclave.policy,
        "collateral": setup.enclave.collateral,
        "identity": setup.identity,
        "model": setup.partitioner.model,
        "plan": setup.plan(),
        "example_input": setup.partitioner.example_inputs[0],
        "clock": lambda: float(DEV_NOW),
        "timeout": 20.0,
    }
    options.update(overrides)
    return open_session(setup.address, **options)


def _inputs(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(1, 1, 32, 32, generator=generator) for _ in range(n)]


def _local(setup: Setup, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = setup.partitioner.model(x)
    return result


@pytest.mark.parametrize(("codec", "tolerance"), [("float32", 1e-5), ("int8", 0.02)])
async def test_infer_matches_local_unsplit_inference(
    setup: Setup, codec: str, tolerance: float
) -> None:
    async with _session(setup, plan=setup.plan(codec)) as session:
        for x in _inputs(3):
            y = await session.infer(x)
            assert isinstance(y, torch.Tensor)
            torch.testing.assert_close(y, _local(setup, x), atol=tolerance, rtol=0)
    assert len(session.receipts) == 3


async def test_pipelined_requests_come_back_in_order(setup: Setup) -> None:
    xs = _inputs(24)
    async with _session(setup, plan=setup.plan("float32")) as session:
        ys = await session.infer_many(xs, max_in_flight=8)
        streamed = [y async for y in session.infer_stream(iter(xs[:5]), max_in_flight=3)]
    assert len(ys) == 24
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(y, _local(setup, x), atol=1e-5, rtol=0)
    for x, y in zip(xs[:5], streamed, strict=True):
        torch.testing.assert_close(y, _local(setup, x), atol=1e-5, rtol=0)


async def test_receipts_are_signed_records_the_ledger_accepts(setup: Setup) -> None:
    async with _session(setup) as session:
        await session.infer_many(_inputs(4))
    assert len(session.receipts) == 4
    enclave_address = setup.edge.identity.address
    seqs = [r.request.device_seq for r in session.receipts]
    assert len(set(seqs)) == 4
    for receipt in session.receipts:
        assert receipt.result.matches(receipt.request)
        assert receipt.request.recover(receipt.device_sig, receipt.domain) == (
            setup.identity.address
        )
        assert receipt.result.recover(receipt.edge_sig, receipt.domain) == enclave_address
        assert receipt.request.edge == enclave_address
        assert receipt.result.measurement == setup.edge.identity.measurement
    # The edge journaled exactly these records.
    journaled = {e.request.task_id for e in setup.journal.entries}
    assert journaled == {r.request.task_id for r in session.receipts}
    assert all(len(r.input_salt) == 32 for r in session.receipts)
    # The session chains its requests and uses default task ids (both shrink calldata).
    requests = sorted((r.request for r in session.receipts), key=lambda q: q.device_seq)
    assert requests[0].prev_request == bytes(32)
    for before, after in itertools.pairwise(requests):
        assert after.prev_request == before.struct_hash()
    assert all(q.task_id == task_id_for(q.device, q.input_commitment) for q in requests)


async def test_fresh_evidence_is_checked_when_the_policy_requires_it(setup: Setup) -> None:
    policy = dataclasses.replace(setup.enclave.policy, require_nonce=True)
    async with _session(setup, policy=policy) as session:
        assert isinstance(await session.infer(_inputs(1)[0]), torch.Tensor)


async def test_unknown_device_is_refused_with_unauthorized(setup: Setup) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        async with _session(setup, identity=DeviceIdentity.generate()):
            pass
    assert info.value.code == ErrorCode.UNAUTHORIZED


async def test_measurement_not_allowed_is_refused(setup: Setup) -> None:
    policy = dataclasses.replace(setup.enclave.policy, mrenclave=frozenset({b"\x00" * 32}))
    with pytest.raises(MeasurementError):
        async with _session(setup, policy=policy):
            pass
    assert setup.journal.entries == []


async def test_unserved_codec_fails_one_task_and_keeps_the_session(setup: Setup) -> None:
    x = _inputs(1)[0]
    async with _session(setup, plan=setup.plan("float16")) as session:
        with pytest.raises(RemoteProtocolError) as info:
            await session.infer(x)
        assert info.value.code == ErrorCode.BAD_TENSOR
        session.plan = setup.plan("float32")  # the same connection still works
        torch.testing.assert_close(await session.infer(x), _local(setup, x), atol=1e-5, rtol=0)


async def test_model_with_other_weights_is_refused_before_connecting(setup: Setup) -> None:
    other = setup.partitioner.model.__class__()
    with pytest.raises(PartitionError, match="plan"):
        async with _session(setup, model=other):
            pass
    assert setup.edge.stats["sessions"] == 0


async def test_head_only_model_is_accepted(setup: Setup) -> None:
    head, _ = setup.partitioner.split(setup.cut)
    x = _inputs(1)[0]
    async with _session(setup, model=head, example_input=None) as session:
        assert isinstance(session, Session)
        torch.testing.assert_close(await session.infer(x), _local(setup, x), atol=0.02, rtol=0)
