"""Disputes that open output commitments (issue 11), against the real contract on the
in-process EVM: agreeing results cannot be disputed, a liar among three is the dissenter,
and every piece of evidence is checked."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import pytest_asyncio
from eth_account import Account
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_ci.exceptions import ContractRevertError, RecordError
from secure_ci.ledger import LedgerClient, OutputOpening, canonical_digest, open_ledger
from secure_ci.ledger._chain import as_opening, as_task_request, as_task_result
from secure_ci.ledger._records import keccak256
from secure_ci.testing import LedgerWorld, ledger_world
from secure_ci.testing._ledger_world import DisputeEvidence

pytestmark = pytest.mark.asyncio(loop_scope="module")
ZERO = bytes(32)
_TASKS = itertools.count()  # a fresh task per example, even when hypothesis repeats one


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def ledger() -> AsyncIterator[LedgerClient]:
    async with open_ledger("inprocess") as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(ledger: LedgerClient) -> LedgerWorld:
    return await ledger_world(ledger, edges=4, devices=2, seed=7)


async def reverts(name: str, coro: object) -> None:
    with pytest.raises(ContractRevertError) as info:
        await coro  # type: ignore[misc]
    assert info.value.reason == name


def _resign(
    world: LedgerWorld, evidence: DisputeEvidence, edge: object, **change: object
) -> DisputeEvidence:
    """``evidence`` with its result changed and signed again by ``edge``."""
    request, result, _, opening = evidence
    changed = replace(result, **change)  # type: ignore[arg-type]
    return request, changed, world.sign(edge, changed), opening  # type: ignore[arg-type]


async def test_agreeing_results_cannot_be_disputed(world: LedgerWorld) -> None:
    """Honest edges salt their commitments differently, yet their canonical digests are equal:
    the chain refuses the dispute, whoever files it."""
    ledger, edges = world.ledger, world.edges
    same = world.redundant(edges[:2], task=b"agree", outputs=(b"cat", b"cat"))
    assert same[0][1].output_commitment != same[1][1].output_commitment  # salted apart
    assert same[0][3].canonical == same[1][3].canonical
    await reverts("SameOutput", ledger.dispute(world.devices[0], same))
    three = world.redundant(edges[:3], task=b"agree3", outputs=(b"cat",) * 3)
    await reverts("SameOutput", ledger.dispute(world.devices[1], three))


async def test_a_liar_among_three_is_recorded_as_the_dissenter(world: LedgerWorld) -> None:
    ledger, (a, liar, c, d) = world.ledger, world.edges
    evidence = world.redundant((a, liar, c), task=b"liar", outputs=(b"cat", b"dog", b"cat"))
    before = await ledger.dissents(liar.address)
    reporter = world.devices[1]  # not the task's device: the openings make it objective
    dispute_id = await ledger.dispute(reporter, evidence)
    info = await ledger.dispute_info(dispute_id)
    request = evidence[0][0]
    assert info.task_id == request.task_id
    assert info.input_key == keccak256(bytes(12) + request.device + request.input_commitment)
    assert info.majority == evidence[0][3].canonical
    assert info.majority == canonical_digest(keccak256(b"input salt" + b"liar"), b"cat")
    assert (info.reporter, info.edges, info.dissenters) == (reporter.address, 3, 1)
    assert await ledger.dissents(liar.address) == before + 1
    assert await ledger.dissents(a.address) == await ledger.dissents(c.address) == 0
    # the same edges again, in any order: once
    await reverts("DisputeExists", ledger.dispute(reporter, evidence[::-1]))
    # a bigger set on the same task records a dispute, but counts the liar once per task
    four = world.redundant((a, liar, c, d), task=b"liar", outputs=(b"cat", b"dog", b"cat", b"cat"))
    info4 = await ledger.dispute_info(await ledger.dispute(reporter, four))
    assert (info4.edges, info4.dissenters) == (4, 1)
    assert await ledger.dissents(liar.address) == before + 1


async def test_no_strict_majority_records_no_dissenter(world: LedgerWorld) -> None:
    ledger, edges = world.ledger, world.edges
    counts = [await ledger.dissents(e.address) for e in edges]
    for task, outputs in [(b"split2", (b"cat", b"dog")), (b"split3", (b"cat", b"dog", b"fish")),
                          (b"split4", (b"cat", b"dog", b"cat", b"dog"))]:  # fmt: skip
        evidence = world.redundant(edges[: len(outputs)], task=task, outputs=outputs)
        info = await ledger.dispute_info(await ledger.dispute(world.devices[0], evidence))
        assert (info.majority, info.dissenters, info.edges) == (ZERO, 0, len(outputs))
    assert [await ledger.dissents(e.address) for e in edges] == counts


async def test_a_bad_opening_reverts(world: LedgerWorld) -> None:
    ledger, edges, device = world.ledger, world.edges, world.devices[0]
    evidence = world.redundant(edges[:3], task=b"open", outputs=(b"cat", b"dog", b"cat"))
    request, result, sig, opening = evidence[1]
    for bad in [
        replace(opening, salt=bytes(32)),
        replace(opening, canonical=evidence[0][3].canonical),  # claim the majority's output
        replace(opening, payload=evidence[0][3].payload),
        OutputOpening(opening.canonical, opening.salt, opening.payload),  # fields swapped
    ]:
        await reverts(
            "BadOpening",
            ledger.dispute(device, [evidence[0], (request, result, sig, bad), evidence[2]]),
        )
    with pytest.raises(RecordError):  # a receipt without an opening is no evidence
        await ledger.dispute(device, [evidence[0], (request, result, sig, None)])


async def test_results_of_different_inputs_cannot_be_disputed(world: LedgerWorld) -> None:
    ledger, (a, b, c, _) = world.ledger, world.edges
    device = world.devices[0]
    one = world.redundant((a, b), task=b"input one", outputs=(b"cat", b"dog"))
    two = world.redundant((a, b), task=b"input two", outputs=(b"cat", b"dog"))
    await reverts("DisputeTaskMismatch", ledger.dispute(device, [one[0], two[1]]))
    # the same task id over another input (or from another device, model or cut)
    request, result, _, opening = two[1]
    for change in [
        {"input_commitment": keccak256(b"other input")},
        {"device": bytes.fromhex(world.devices[1].address[2:])},
        {"model_id": keccak256(b"other model")},
        {"cut": 4},
    ]:
        moved = replace(request, task_id=one[0][0].task_id, **change)  # type: ignore[arg-type]
        forged = replace(result, task_id=moved.task_id, request_hash=moved.struct_hash())
        evidence = (moved, forged, world.sign(b, forged), opening)
        await reverts("DisputeTaskMismatch", ledger.dispute(device, [one[0], evidence]))
    # a result that answers another request than the one given
    await reverts(
        "DisputeTaskMismatch",
        ledger.dispute(device, [one[0], _resign(world, one[1], b, request_hash=keccak256(b"x"))]),
    )
    # b's answer presented as signed by another edge than its request names
    await reverts(
        "DisputeTaskMismatch", ledger.dispute(device, [one[0], _resign(world, one[1], c)])
    )
    request, result, _, opening = one[1]
    await reverts(
        "InvalidEdgeSignature",
        ledger.dispute(device, [one[0], (request, result, bytes(65), opening)]),
    )
    same_edge = world.redundant((a, a), task=b"one edge", outputs=(b"cat", b"dog"))
    await reverts("SameEdge", ledger.dispute(device, same_edge))
    stranger = Account.create()
    unknown = world.redundant((a, stranger), task=b"stranger", outputs=(b"cat", b"dog"))
    await reverts("UnknownEdge", ledger.dispute(device, unknown))
    await reverts("DisputeSize", ledger.dispute(device, one[:1]))
    requests = [as_task_request(e[0]) for e in one]
    openings = [as_opening(e[3]) for e in one]
    short = ledger._contract.functions.dispute(  # one result for two requests
        requests, [as_task_result(one[0][1])], [e[2] for e in one], openings
    )
    await reverts("DisputeSize", ledger._transact(device, short))
    await reverts("DisputeSize", ledger.dispute(device, [one[0], one[1]] * 4 + [one[0]]))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.binary(min_size=8, max_size=8),
    st.sampled_from(["none", "salt", "canonical", "payload", "rotate"]),
    st.integers(0, 31),
    st.integers(1, 255),
)
async def test_the_opening_check_accepts_exactly_the_committed_triple(
    world: LedgerWorld, tag: bytes, field: str, byte: int, flip: int
) -> None:
    ledger, edges = world.ledger, world.edges
    evidence = world.redundant(
        edges[:2], task=b"prop" + tag + next(_TASKS).to_bytes(4, "big"), outputs=(b"cat", b"dog")
    )
    request, result, sig, opening = evidence[0]
    if field == "rotate":
        opened = OutputOpening(opening.payload, opening.salt, opening.canonical)
    elif field != "none":
        value = bytearray(getattr(opening, field))
        value[byte] ^= flip
        opened = replace(opening, **{field: bytes(value)})
    else:
        opened = opening
    call = ledger.dispute(world.devices[0], [(request, result, sig, opened), evidence[1]])
    if field == "none":
        assert (await ledger.dispute_info(await call)).edges == 2
    else:
        assert opened.commitment() != result.output_commitment
        await reverts("BadOpening", call)
