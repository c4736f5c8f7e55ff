"""Redundant inference: one task to k real edges, majority vote, dispute filed on the chain."""

from __future__ import annotations

import asyncio
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
from secure_ci.exceptions import (
    ConfigError,
    ContractRevertError,
    DisagreementError,
    RemoteProtocolError,
)
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


class _Recording(torch.nn.Module):
    """An honest tail that notes the batch size of every call."""

    def __init__(self, tail: torch.nn.Module) -> None:
        super().__init__()
        self.tail, self.sizes = tail, list[int]()

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(xs[0].shape[0]))
        out: torch.Tensor = self.tail(*xs)
        return out


def _models(mode: str) -> ModelRegistry:
    models = ModelRegistry()
    for tail in load_zoo_tails("digits_cnn", [CUT], ("int8",), seed=0):
        wrapped = _Recording(tail.tail) if mode == "record" else _Deviating(tail.tail, mode)
        models.add(dataclasses.replace(tail, tail=wrapped) if mode else tail)
    return models


@contextlib.asynccontextmanager
async def _world(
    partitioner: Partitioner,
    ledger: LedgerClient,
    modes: tuple[str, ...],
    limits: tuple[EdgeLimits, ...] | None = None,
) -> AsyncIterator[tuple[list[Any], list[EdgeService], DeviceIdentity]]:
    """Edges of one dev enclave (mode "" honest, "record" honest noting its batch sizes,
    else a _Deviating mode; ``limits`` per edge), a session to each."""
    enclave: DevEnclave = dev_enclave(DEV_NOW)
    identity = DeviceIdentity.generate()
    config = EdgeConfig(
        limits=EdgeLimits(max_wait_ms=1.0),
        allowed_devices=frozenset({identity.address}),
        chain_id=ledger.chain_id,
        contract=bytes.fromhex(str(ledger.address)[2:]),
    )
    plan = PartitionPlan(partitioner.model_id, CUT, "int8")
    configs = [
        config if limits is None else dataclasses.replace(config, limits=limits[i])
        for i in range(len(modes))
    ]
    async with contextlib.AsyncExitStack() as stack:
        edges = [
            await stack.enter_async_context(
                open_edge(
                    configs[i], provider=enclave.provider, models=_models(mode),
                    journal=MemoryJournal(), clock=lambda: float(DEV_NOW),
                )
            )
            for i, mode in enumerate(modes)
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
        evidence = result.disputes()  # all three opened receipts: one k-way dispute
        assert [r.result for r in evidence] == [r.result for r in result.receipts if r]
        # the edges must be registered enclave keys; anyone holding the openings may file
        admin = Account.create()
        device = Account.from_key(identity.key)
        for who in (admin, device):
            await ledger.fund(who.address, 10**20)
        party = await ledger.register_party(admin.address)
        for measurement in {edge.identity.measurement for edge in edges}:
            await ledger.allow_measurement(measurement)  # an edge registers with a release
        for edge in edges:
            enclave_key = Account.from_key(edge.identity.signing_key)
            await ledger.register_edge(
                admin, party, enclave_key, edge.identity.measurement, edge.identity.quote_id,
                f"127.0.0.1:{edge.port}",
            )  # fmt: skip
        dispute_id = await ledger.dispute(device, evidence)
        info = await ledger.dispute_info(dispute_id)
        assert (info.edges, info.dissenters) == (3, 1)
        assert info.task_id == evidence[0].request.task_id
        honest = result.receipts[0]
        assert honest is not None
        assert honest.opening is not None
        assert info.majority == honest.opening.canonical
        liar = edges[1].identity.address
        assert await ledger.dissents(liar) == 1
        assert await ledger.dissents(edges[0].identity.address) == 0


async def test_honest_edges_that_batch_differently_agree_canonically(
    partitioner: Partitioner,
) -> None:
    """One edge runs every request alone, the other batches four: for each input their
    canonical digests are equal (their salted commitments are not), so the chain refuses to
    dispute them."""
    alone = EdgeLimits(max_wait_ms=0.0, max_batch=1)
    batched = EdgeLimits(max_wait_ms=5_000.0, max_batch=4)  # a batch closes when 4 are queued
    async with (
        open_ledger("inprocess") as ledger,
        _world(partitioner, ledger, ("record", "record"), (alone, batched)) as (
            sessions, edges, identity,
        ),
    ):  # fmt: skip
        tails = [e.models.entries()[0].tail for e in edges]
        for tail in tails:
            tail.sizes.clear()  # the batching probe at load
        generator = torch.Generator().manual_seed(5)
        xs = [torch.randn(1, 1, 32, 32, generator=generator) for _ in range(4)]
        results = await asyncio.gather(*(infer_redundant(sessions, x) for x in xs))
        assert set(tails[0].sizes) == {1}
        assert max(tails[1].sizes) > 1  # the second edge really batched
        for result in results:
            one, other = result.receipts
            assert one is not None
            assert other is not None
            assert one.opening is not None
            assert other.opening is not None
            assert one.opening.canonical == other.opening.canonical
            assert one.result.output_commitment != other.result.output_commitment
            assert result.disputes() == ()  # nothing to dispute
        admin, device = Account.create(), Account.from_key(identity.key)
        for who in (admin, device):
            await ledger.fund(who.address, 10**20)
        party = await ledger.register_party(admin.address)
        await ledger.allow_measurement(edges[0].identity.measurement)
        for edge in edges:
            await ledger.register_edge(
                admin, party, Account.from_key(edge.identity.signing_key),
                edge.identity.measurement, edge.identity.quote_id, f"127.0.0.1:{edge.port}",
            )  # fmt: skip
        with pytest.raises(ContractRevertError, match="SameOutput"):
            await ledger.dispute(device, results[0].receipts)


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
        # the float64 answer is outside the tolerance yet has the same top-1 label: under
        # the model's canonical rule it agrees, so there is nothing the chain would dispute
        assert result.disputes() == ()
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
