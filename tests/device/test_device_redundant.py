"""Redundant inference: one task to k real edges, majority vote, dispute filed on the chain."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from eth_account import Account
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.device import DeviceIdentity, infer_redundant, open_session, outputs_agree
from secure_ci.edge import EdgeConfig, EdgeLimits, ModelRegistry, open_edge
from secure_ci.edge._identity import MemoryJournal
from secure_ci.edge._models import load_zoo_tails
from secure_ci.edge._service import EdgeService
from secure_ci.exceptions import ConfigError, DisagreementError, RemoteProtocolError
from secure_ci.ledger import LedgerClient, open_ledger, task_id_for
from secure_ci.partition import Partitioner, PartitionPlan
from secure_ci.testing import DEV_NOW, DevEnclave, dev_enclave
from secure_ci.zoo import get

CUT = 2


class _Deviating(torch.nn.Module):
    """A tail that answers something else (``fail``: nothing) as a faulty edge would."""

    def __init__(self, tail: torch.nn.Module, mode: str) -> None:
        super().__init__()
        self.tail, self.mode = tail, mode

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.tail(*xs)
        if self.mode == "fail":
            raise RuntimeError("the tail broke")
        return out.flip(-1) + 1.0 if self.mode == "deviate" else out.double()


@pytest.fixture(scope="module")
def partitioner() -> Partitioner:
    entry = get("digits_cnn")
    torch.manual_seed(0)  # the same weights as load_zoo_tails(seed=0) on the edges
    return Partitioner(entry.build(), (torch.zeros(entry.input_shape),))


def _models(mode: str) -> ModelRegistry:
    models = ModelRegistry()
    for tail in load_zoo_tails("digits_cnn", [CUT], ("int8",), seed=0):
        models.add(dataclasses.replace(tail, tail=_Deviating(tail.tail, mode)) if mode else tail)
    return models


@contextlib.asynccontextmanager
async def _world(
    partitioner: Partitioner, ledger: LedgerClient, modes: tuple[str, ...]
) -> AsyncIterator[tuple[list[Any], list[EdgeService], DeviceIdentity]]:
    """Edges of one dev enclave (mode "" honest, else a _Deviating mode), a session to each."""
    enclave: DevEnclave = dev_enclave(DEV_NOW)
    identity = DeviceIdentity.generate()
    config = EdgeConfig(
        limits=EdgeLimits(max_wait_ms=1.0),
        allowed_devices=frozenset({identity.address}),
        chain_id=ledger.chain_id,
        contract=bytes.fromhex(str(ledger.address)[2:]),
    )
    plan = PartitionPlan(partitioner.model_id, CUT, "int8")
    async with contextlib.AsyncExitStack() as stack:
        edges = [
            await stack.enter_async_context(
                open_edge(
                    config, provider=enclave.provider, models=_models(mode),
                    journal=MemoryJournal(), clock=lambda: float(DEV_NOW),
                )
            )
            for mode in modes
        ]  # fmt: skip
        sessions = [
            await stack.enter_async_context(
                open_session(
                    f"127.0.0.1:{edge.port}", policy=enclave.policy,
                    collateral=enclave.collateral, identity=identity, model=partitioner.model,
                    plan=plan, example_input=partitioner.example_inputs[0],
                    ledger_domain=ledger.domain, clock=lambda: float(DEV_NOW), timeout=20.0,
                )
            )
            for edge in edges
        ]  # fmt: skip
        yield sessions, edges, identity


async def test_majority_wins_and_the_dissenter_is_disputed_on_chain(
    partitioner: Partitioner,
) -> None:
    async with (
        open_ledger("inprocess") as ledger,
        _world(partitioner, ledger, ("", "deviate", "")) as (sessions, edges, identity),
    ):
        x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
        result = await infer_redundant(sessions, x)
        with torch.no_grad():
            torch.testing.assert_close(result.output, partitioner.model(x), rtol=0.1, atol=0.1)
        assert (result.majority, result.dissenters) == ((0, 2), (1,))
        assert not result.failures
        requests = [r.request for r in result.receipts if r is not None]
        assert len({q.task_id for q in requests}) == 1  # one task, three edges
        assert len({q.input_commitment for q in requests}) == 1
        assert requests[0].task_id == task_id_for(identity.address, requests[0].input_commitment)
        ((good, bad),) = result.disputes()
        # the device files the evidence: both edges must be registered enclave keys
        admin = Account.create()
        device = Account.from_key(identity.key)
        for who in (admin, device):
            await ledger.fund(who.address, 10**20)
        party = await ledger.register_party(admin.address)
        for measurement in {edge.identity.measurement for edge in edges[:2]}:
            await ledger.allow_measurement(measurement)  # an edge registers with a release
        for edge in (edges[0], edges[1]):
            enclave_key = Account.from_key(edge.identity.signing_key)
            await ledger.register_edge(
                admin, party, enclave_key, edge.identity.measurement, edge.identity.quote_id,
                f"127.0.0.1:{edge.port}",
            )  # fmt: skip
        dispute_id = await ledger.dispute(
            device, good.request, good.result, good.edge_sig, bad.request, bad.result, bad.edge_sig
        )
        info = await ledger.dispute_info(dispute_id)
        assert (info.output_a, info.output_b) == (
            good.result.output_commitment,
            bad.result.output_commitment,
        )
        assert info.task_id == good.request.task_id


async def test_two_edges_that_disagree_give_no_result(partitioner: Partitioner) -> None:
    async with (
        open_ledger("inprocess") as ledger,
        _world(partitioner, ledger, ("", "deviate")) as (sessions, _, _),
    ):
        with pytest.raises(DisagreementError) as caught:
            await infer_redundant(sessions, torch.randn(1, 1, 32, 32))
        assert len(caught.value.receipts) == 2
        with pytest.raises(ConfigError):
            await infer_redundant(sessions[:1], torch.randn(1, 1, 32, 32))
        with pytest.raises(ConfigError):
            await infer_redundant([sessions[0], sessions[0]], torch.randn(1, 1, 32, 32))


async def test_failed_and_incomparable_answers_are_not_votes(partitioner: Partitioner) -> None:
    """A failing edge casts no vote; an answer of another dtype dissents instead of crashing."""
    async with (
        open_ledger("inprocess") as ledger,
        _world(partitioner, ledger, ("", "fail", "", "double", "")) as (sessions, _, _),
    ):
        result = await infer_redundant(sessions, torch.randn(1, 1, 32, 32))
        assert (result.majority, result.dissenters) == ((0, 2, 4), (3,))
        assert list(result.failures) == [1]
        assert isinstance(result.failures[1], RemoteProtocolError)
        assert result.receipts[1] is None
        ((_, dissent),) = result.disputes()
        assert dissent is result.receipts[3]
        with pytest.raises(DisagreementError) as caught:  # 2 of 4 is not a strict majority
            await infer_redundant(sessions[:4], torch.randn(1, 1, 32, 32))
        assert len(caught.value.receipts) == 3


@given(st.lists(st.floats(-100, 100), min_size=1, max_size=8), st.floats(0, 1))
def test_outputs_agree_is_a_tolerance_check(values: list[float], noise: float) -> None:
    a = torch.tensor(values)
    assert outputs_agree(a, a.clone())
    assert outputs_agree(a, a + 1e-6 * noise)
    assert outputs_agree((a, a), (a, a))
    assert not outputs_agree((a,), (a, a))
    assert not outputs_agree(a, a[:-1])
    assert not outputs_agree(a, a + 1.0 + noise)
    assert not outputs_agree(a, a.double())
    assert not outputs_agree(a, a + float("nan"))
