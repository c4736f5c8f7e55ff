"""Records bound on chain and positions bound in proofs (issue 11), against the real contract
on the in-process EVM: each attack here got through the contract before these changes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest
import pytest_asyncio
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secure_ci.exceptions import ContractRevertError
from secure_ci.ledger import (
    REFUSAL_NOT_RECEIVED,
    AnvilNode,
    BatchFault,
    LedgerClient,
    find_anvil,
    open_ledger,
    refusal_digest,
    run_anvil,
)
from secure_ci.ledger._calldata import BatchRecords, decode_batch, encode_batch
from secure_ci.ledger._findings import BadBatch, FindingCode, check_batch
from secure_ci.ledger._merkle import MerkleTree, chain_head, leaf_hash
from secure_ci.ledger._records import TaskRequest, TaskResult, sign_digest, task_id_for
from secure_ci.testing import LedgerWorld, ledger_world, sample_tasks

pytestmark = pytest.mark.asyncio(loop_scope="module")
ZERO = bytes(32)


@pytest.fixture(scope="module")
def anvil() -> Iterator[AnvilNode]:
    if find_anvil() is None:
        pytest.skip("anvil missing from ledger/node_modules (run `make node`)")
    with run_anvil() as node:
        yield node


@pytest_asyncio.fixture(
    loop_scope="module",
    scope="module",
    params=["inprocess", pytest.param("anvil", marks=pytest.mark.anvil)],
)
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[LedgerClient]:
    backend = "inprocess"
    if request.param == "anvil":
        backend = request.getfixturevalue("anvil").url
    async with open_ledger(backend) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(ledger: LedgerClient) -> LedgerWorld:
    return await ledger_world(ledger, edges=4, devices=2, seed=11)


async def reverts(name: str, coro: object) -> None:
    with pytest.raises(ContractRevertError) as info:
        await coro  # type: ignore[misc]
    assert info.value.reason == name


async def test_head_chain_commits_to_the_records(world: LedgerWorld) -> None:
    """Two batches with the same root but other published records get other heads."""
    ledger, edge = world.ledger, world.edges[0]
    results = [world.result(seq, task=b"heads") for seq in range(2)]
    _, tree, receipt = await world.anchor(edge, results, b"published records")
    assert receipt.new_head == chain_head(ZERO, tree.root, keccak(b"published records"), 0, 2)
    assert receipt.new_head != chain_head(ZERO, tree.root, keccak(b"other records"), 0, 2)
    assert await ledger.batch_records_hash(edge.address, 0) == keccak(b"published records")
    await reverts("UnknownBatch", ledger.batch_records_hash(edge.address, 1))
    state = await ledger.edge_state(edge.address)
    await reverts(
        "BatchTooLarge",
        ledger.anchor_batch(edge, 1, tree.root, state.next_seq, 2049, state.head, b""),
    )


async def test_leaf_at_the_wrong_position_does_not_answer(world: LedgerWorld) -> None:
    """The edge builds its tree with the challenged record at another position (so the
    position the calldata shows holds something else): with OpenZeppelin's sorted pairs its
    proof was accepted; a positional proof of that position is not."""
    ledger, edge, device = world.ledger, world.edges[1], world.devices[0]
    domain = ledger.domain
    other = world.result(0, task=b"shown")
    shown = leaf_hash(0, other.digest(domain))
    for tag in range(256):  # a record whose leaf sorts first: the sorted-pair root is then
        challenged = world.result(1, task=b"moved" + bytes([tag]))  # this positional one
        moved = leaf_hash(1, challenged.digest(domain))
        if moved < shown:
            break
    root = keccak(moved + shown)  # the leaf of seq 1 placed at index 0
    await ledger.anchor_batch(edge, 0, root, 0, 2, ZERO, b"")
    cid = await ledger.challenge(device, challenged, world.sign(edge, challenged))
    await reverts("InvalidProof", ledger.respond_challenge(edge, cid, 0, [shown]))
    assert not await ledger.verify_task(edge.address, 0, 1, challenged.digest(domain), [shown])
    # nor with the proof padded or cut
    await reverts("InvalidProof", ledger.respond_challenge(edge, cid, 0, [shown, shown]))
    await reverts("InvalidProof", ledger.respond_challenge(edge, cid, 0, []))


async def test_positional_proofs_on_chain_match_python(world: LedgerWorld) -> None:
    ledger, edge = world.ledger, world.edges[2]
    for count in (1, 2, 3, 5, 7, 12):
        state = await ledger.edge_state(edge.address)
        results = [world.result(state.next_seq + i, task=b"pos") for i in range(count)]
        batch_id, tree, _ = await world.anchor(edge, results)
        for i, r in enumerate(results):
            digest = r.digest(ledger.domain)
            assert await ledger.verify_task(
                edge.address, batch_id, r.edge_seq, digest, tree.proof(i)
            )
            if count > 1:
                j = (i + 1) % count
                assert not await ledger.verify_task(
                    edge.address, batch_id, r.edge_seq, digest, tree.proof(j)
                )


# ---------------------------------------------------------------- fraud proofs


def _honest(
    world: LedgerWorld, edge: LocalAccount, first_seq: int, n: int, seed: int
) -> tuple[bytes, bytes]:
    """(calldata, root) of ``n`` correctly signed records of ``edge`` from ``first_seq``."""
    entries = sample_tasks(
        n, edge_key=bytes(edge.key), domain=world.ledger.domain, first_seq=first_seq,
        devices=3, seed=seed, measurement=world.measurement, quote_id=world.quote_id,
    )  # fmt: skip
    calldata = encode_batch(
        BatchRecords(_addr(edge), first_seq, tuple(e.anchored() for e in entries))
    )
    root = MerkleTree.build([leaf_hash(e.result.edge_seq, e.record_hash) for e in entries]).root
    return calldata, root


def _addr(account: LocalAccount) -> bytes:
    return bytes.fromhex(account.address[2:])


async def _anchor_raw(
    ledger: LedgerClient, edge: LocalAccount, root: bytes, count: int, records: bytes
) -> int:
    state = await ledger.edge_state(edge.address)
    await ledger.anchor_batch(
        edge, state.next_batch_id, root, state.next_seq, count, state.head, records
    )
    return int(state.next_batch_id)


async def test_forged_calldata_is_proven_fraud(world: LedgerWorld) -> None:
    """The edge anchors the root of its records but publishes calldata with one output
    commitment changed: before, nothing on chain could tell; now anyone proves it."""
    ledger, edge, device = world.ledger, world.edges[3], world.devices[1]
    calldata, root = _honest(world, edge, 0, 12, seed=1)
    honest_id = await _anchor_raw(ledger, edge, root, 12, calldata)
    await reverts("NoFraud", ledger.prove_fraud(device, edge.address, honest_id, calldata))
    assert await ledger.check_fraud(edge.address, honest_id, calldata) is None
    await reverts("RecordsMismatch", ledger.prove_fraud(device, edge.address, honest_id, b"x"))
    await reverts("UnknownBatch", ledger.prove_fraud(device, edge.address, 7, calldata))

    calldata2, root2 = _honest(world, edge, 12, 5, seed=2)
    batch = decode_batch(calldata2)
    rec = batch.records[3]
    forged_result = replace(rec.result, output_commitment=keccak(b"forged"))
    forged = encode_batch(
        replace(batch, records=(*batch.records[:3], replace(rec, result=forged_result),
                                *batch.records[4:]))
    )  # fmt: skip
    assert len(forged) == len(calldata2)
    forged_id = await _anchor_raw(ledger, edge, root2, 5, forged)
    # the edge answers a challenge of the true record with a valid proof of the true root
    true = rec.result
    cid = await ledger.challenge(device, true, true.sign(bytes(edge.key), ledger.domain))
    tree_proof = MerkleTree.build(
        [leaf_hash(r.result.edge_seq, r.result.digest(ledger.domain)) for r in batch.records]
    ).proof(3)
    leaf = (edge.address, forged_id, true.edge_seq, true.digest(ledger.domain), tree_proof)
    assert await ledger.verify_task(*leaf)  # the true record proves against the true root
    assert await ledger.check_fraud(edge.address, forged_id, forged) == BatchFault.ROOT_MISMATCH
    fault = await ledger.prove_fraud(device, edge.address, forged_id, forged)
    assert not await ledger.verify_task(*leaf)  # a batch proven fraudulent proves nothing
    assert fault == BatchFault.ROOT_MISMATCH
    assert await ledger.fraud_count(edge.address) == 1
    assert await ledger.batch_fault(edge.address, forged_id) == BatchFault.ROOT_MISMATCH
    assert await ledger.batch_fault(edge.address, honest_id) is None
    await reverts("FraudAlreadyProven", ledger.prove_fraud(device, edge.address, forged_id, forged))
    # a faulty edge cannot anchor or answer, and its challenges end as omissions at once
    more, more_root = _honest(world, edge, 17, 2, seed=3)
    await reverts("EdgeFaulty", _anchor_raw(ledger, edge, more_root, 2, more))
    await reverts("EdgeFaulty", ledger.respond_challenge(edge, cid, forged_id, tree_proof))
    await ledger.finalize_challenge(device, cid)
    assert (await ledger.challenge_info(cid)).state == 3
    assert (await ledger.edge_state(edge.address)).omissions == 1


def _record_offsets(calldata: bytes) -> list[int]:
    """Where each record starts (a walk of the format, written from its description)."""
    pos = 34 + (36 if calldata[1] & 1 else 0)
    for width in (20, 32, 64):
        pos += 2 + width * int.from_bytes(calldata[pos : pos + 2], "big")
    offsets = []
    while pos < len(calldata):
        offsets.append(pos)
        kind = calldata[pos]
        pos += 1 + (34 if kind & 1 else 2) + 91 + (32 if kind & 2 else 0) + (65 if kind & 4 else 0)
    return offsets


def _mutations(calldata: bytes) -> dict[BatchFault, bytes]:
    """One calldata breaking each rule the contract checks (from an honest ``calldata``)."""
    batch = decode_batch(calldata)
    offsets = _record_offsets(calldata)
    first = offsets[0]
    linked = next(o for o in offsets if not calldata[o] & 1)  # a back reference
    n_dev = int.from_bytes(calldata[34:36], "big")
    last = batch.records[-1]  # a chain end: changing its task id changes no other record
    explicit = replace(last.request, task_id=keccak(b"explicit"))
    res = replace(last.result, task_id=explicit.task_id, request_hash=explicit.struct_hash())
    with_id = encode_batch(
        replace(batch, records=(*batch.records[:-1], replace(last, request=explicit, result=res)))
    )
    o = _record_offsets(with_id)[-1]
    pos_id = o + 1 + (34 if with_id[o] & 1 else 2) + 91
    assert with_id[pos_id : pos_id + 32] == explicit.task_id
    default_id = task_id_for(explicit.device, explicit.input_commitment)
    unsigned = next(o for o in offsets if not calldata[o] & 4)  # covered by a later one
    end = unsigned + 1 + (34 if calldata[unsigned] & 1 else 2) + 91
    end += 32 if calldata[unsigned] & 2 else 0
    output = first + 1 + 34 + 52  # record 0's output commitment
    return [
        (BatchFault.TRUNCATED, calldata[:-1]),
        (BatchFault.TRAILING_BYTES, calldata + b"\x00"),
        (BatchFault.BAD_VERSION, b"\x03" + calldata[1:]),
        (BatchFault.HEADER_MISMATCH, calldata[:30] + (99).to_bytes(4, "big") + calldata[34:]),
        (BatchFault.RESERVED_BITS, _set(calldata, first, calldata[first] | 8)),
        (BatchFault.BAD_INDEX, _put(calldata, first + 1, n_dev.to_bytes(2, "big"))),
        (BatchFault.BAD_BACK_REFERENCE, _put(calldata, linked + 1, bytes(2))),
        (BatchFault.NON_CANONICAL, _put(with_id, pos_id, default_id)),
        (  # a device signature the canonical encoding leaves out
            BatchFault.NON_CANONICAL,
            _set(calldata[:end] + b"\x01" * 65 + calldata[end:], unsigned, calldata[unsigned] | 4),
        ),
        (BatchFault.ROOT_MISMATCH, _set(calldata, output, calldata[output] ^ 1)),
    ]


def _set(data: bytes, pos: int, value: int) -> bytes:
    return data[:pos] + bytes([value]) + data[pos + 1 :]


def _put(data: bytes, pos: int, value: bytes) -> bytes:
    return data[:pos] + value + data[pos + len(value) :]


async def test_each_rule_is_provable_and_matches_the_auditor(world: LedgerWorld) -> None:
    """Every rule the contract checks, each on its own batch: the fault it proves is the one
    broken, and the Python auditor (check_batch) rejects the same calldata."""
    ledger, device = world.ledger, world.devices[0]
    edge = world.edges[2]
    cases = []
    for k in range(10):
        state = await ledger.edge_state(edge.address)
        calldata, root = _honest(world, edge, state.next_seq, 9, seed=4)
        fault, bad = _mutations(calldata)[k]
        cases.append((fault, await _anchor_raw(ledger, edge, root, 9, bad), bad, root))
    for fault, batch_id, bad, root in cases:
        info = await ledger.batch(edge.address, batch_id)
        audited = check_batch(ledger.domain, _addr(edge), bad, root, info.first_seq, info.count)
        assert isinstance(audited, BadBatch), fault
        assert await ledger.check_fraud(edge.address, batch_id, bad) == fault
    for fault, batch_id, bad, _ in cases:  # faulty after the first; each batch still proves
        assert await ledger.prove_fraud(device, edge.address, batch_id, bad) == fault
    assert await ledger.fraud_count(edge.address) == len(cases)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.sampled_from(["flip", "truncate", "append", "splice"]),
    st.integers(0, 1 << 16),
    st.binary(min_size=1, max_size=40),
)
async def test_fraud_proof_agrees_with_the_decoder(
    world: LedgerWorld, how: str, where: int, data: bytes
) -> None:
    """Random damage to honest calldata: the contract proves fraud exactly when the Python
    auditor rejects the batch, except for the rules documented as not checked on chain
    (then the records still decode and rebuild the root)."""
    ledger, edge = world.ledger, world.edges[0]
    state = await ledger.edge_state(edge.address)
    calldata, root = _honest(world, edge, state.next_seq, 6, seed=5)
    pos = where % len(calldata)
    bad = {
        "flip": _set(calldata, pos, calldata[pos] ^ (data[0] or 1)),
        "truncate": calldata[:pos],
        "append": calldata + data,
        "splice": calldata[:pos] + data + calldata[pos + len(data) :],
    }[how]
    batch_id = await _anchor_raw(ledger, edge, root, 6, bad)
    audited = check_batch(ledger.domain, _addr(edge), bad, root, state.next_seq, 6)
    fault = await ledger.check_fraud(edge.address, batch_id, bad)
    if not isinstance(audited, BadBatch):
        assert fault is None
    elif fault is None:  # only what the contract does not check: the records are intact
        assert audited.code == FindingCode.BATCH_NON_CANONICAL
        decoded = decode_batch(bad, verify_canonical=False)
        leaves = [
            leaf_hash(r.result.edge_seq, r.result.digest(ledger.domain)) for r in decoded.records
        ]
        assert MerkleTree.build(leaves).root == root


# ---------------------------------------------------------------- request-only challenges


def _request(
    world: LedgerWorld, device: LocalAccount, edge: LocalAccount, tag: bytes
) -> TaskRequest:
    device_addr = _addr(device)
    input_c = keccak(b"input" + tag)
    return TaskRequest(
        task_id_for(device_addr, input_c), device_addr, 1, keccak(b"model"), 3, input_c,
        _addr(edge), 2**40, bytes(32),
    )  # fmt: skip


async def test_request_challenge_answered_with_the_anchored_result(world: LedgerWorld) -> None:
    ledger, edge, device, other = world.ledger, world.edges[1], world.devices[0], world.devices[1]
    domain = ledger.domain
    request = _request(world, device, edge, b"answered")
    signature = request.sign(bytes(device.key), domain)
    await reverts("NotRegisteredDevice", ledger.challenge_request(edge, request, signature))
    await reverts("NotTaskDevice", ledger.challenge_request(other, request, signature))
    await reverts("InvalidDeviceSignature", ledger.challenge_request(device, request, bytes(65)))
    forged = request.sign(bytes(other.key), domain)
    await reverts("InvalidDeviceSignature", ledger.challenge_request(device, request, forged))
    nowhere = replace(request, edge=keccak(b"no edge")[:20])
    await reverts(
        "UnknownEdge",
        ledger.challenge_request(device, nowhere, nowhere.sign(bytes(device.key), domain)),
    )
    cid = await ledger.challenge_request(device, request, signature)
    await reverts("ChallengeExists", ledger.challenge_request(device, request, signature))
    info = await ledger.request_challenge_info(cid)
    assert (info.state, info.device, info.edge) == (1, device.address, edge.address)
    assert info.request_hash == request.struct_hash()

    state = await ledger.edge_state(edge.address)
    seq = state.next_seq
    filler = world.result(seq, task=b"filler")
    result = TaskResult(
        request.task_id, request.struct_hash(), keccak(b"out"), world.measurement,
        world.quote_id, 0, 9, seq + 1,
    )  # fmt: skip
    batch_id, tree, _ = await world.anchor(edge, [filler, result])
    await reverts(
        "RequestMismatch", ledger.answer_request(edge, cid, filler, batch_id, tree.proof(0))
    )
    await reverts("InvalidProof", ledger.answer_request(edge, cid, result, batch_id, tree.proof(0)))
    await reverts("UnknownBatch", ledger.answer_request(edge, cid, result, 99, tree.proof(1)))
    moved = replace(result, edge_seq=seq + 5)
    await reverts("SeqNotInBatch", ledger.answer_request(edge, cid, moved, batch_id, tree.proof(1)))
    await reverts("ChallengeWindowOpen", ledger.finalize_request_challenge(device, cid))
    await ledger.answer_request(device, cid, result, batch_id, tree.proof(1))  # anyone may
    assert (await ledger.request_challenge_info(cid)).state == 2
    await reverts(
        "ChallengeNotOpen", ledger.answer_request(edge, cid, result, batch_id, tree.proof(1))
    )
    await reverts("UnknownChallenge", ledger.request_challenge_info(10**6))


async def test_request_refused_or_omitted(world: LedgerWorld) -> None:
    ledger, edge, device = world.ledger, world.edges[1], world.devices[1]
    domain = ledger.domain
    refused = _request(world, device, edge, b"refused")
    cid = await ledger.challenge_request(device, refused, refused.sign(bytes(device.key), domain))
    digest = refusal_digest(domain, refused.struct_hash(), REFUSAL_NOT_RECEIVED)
    not_edge = sign_digest(bytes(device.key), digest)
    await reverts(
        "InvalidEdgeSignature", ledger.refuse_request(edge, cid, REFUSAL_NOT_RECEIVED, not_edge)
    )
    other_reason = sign_digest(bytes(edge.key), refusal_digest(domain, refused.struct_hash(), 2))
    await reverts(
        "InvalidEdgeSignature", ledger.refuse_request(edge, cid, REFUSAL_NOT_RECEIVED, other_reason)
    )
    zero = sign_digest(bytes(edge.key), refusal_digest(domain, refused.struct_hash(), 0))
    await reverts("InvalidRefusalReason", ledger.refuse_request(edge, cid, 0, zero))
    await reverts("UnknownChallenge", ledger.challenge_info(cid))  # a request challenge's id
    await ledger.refuse_request(
        device, cid, REFUSAL_NOT_RECEIVED, sign_digest(bytes(edge.key), digest)
    )
    info = await ledger.request_challenge_info(cid)
    assert (info.state, info.refusal) == (4, REFUSAL_NOT_RECEIVED)

    dropped = _request(world, device, edge, b"dropped")  # the edge drops it and stays silent
    cid = await ledger.challenge_request(device, dropped, dropped.sign(bytes(device.key), domain))
    before = (await ledger.edge_state(edge.address)).omissions
    await ledger.advance_time(await ledger.challenge_window() + 1)
    await reverts("ChallengeWindowClosed", ledger.refuse_request(edge, cid, 1, bytes(65)))
    await ledger.finalize_request_challenge(device, cid)
    assert (await ledger.request_challenge_info(cid)).state == 3
    assert (await ledger.edge_state(edge.address)).omissions == before + 1
    await reverts("ChallengeNotOpen", ledger.finalize_request_challenge(device, cid))
