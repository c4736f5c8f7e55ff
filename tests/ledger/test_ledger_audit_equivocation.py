"""Equivocation findings on the in-process chain (py-evm, the Solidity contract): an edge whose
anchored record differs from what its enclave signed in a challenge, in a refusal or in a
device's receipt; receipts whose task was never anchored; forged receipts that must not frame
an honest edge; and honest chains, challenges and receipts that give no finding."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import pytest
from eth_abi.abi import encode as abi_encode
from eth_account.signers.local import LocalAccount

from secure_ci.exceptions import SignatureError
from secure_ci.ledger import open_ledger
from secure_ci.ledger._audit import AuditIndex
from secure_ci.ledger._audit_chain import challenged_request
from secure_ci.ledger._audit_receipts import DeviceReceipt, encode_receipts, parse_receipts
from secure_ci.ledger._calldata import AnchoredRecord, BatchRecords, encode_batch
from secure_ci.ledger._findings import FindingCode
from secure_ci.ledger._integrity import REFUSAL_NOT_RECEIVED, refusal_digest
from secure_ci.ledger._records import (
    LedgerDomain,
    TaskRequest,
    TaskResult,
    keccak256,
    sign_digest,
    task_id_for,
)
from secure_ci.testing import LedgerWorld, ledger_world, sample_tasks

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Signed:
    """A device-signed request and the result the edge's enclave signed for it."""

    request: TaskRequest
    device_sig: bytes
    result: TaskResult
    edge_sig: bytes

    def receipt(self) -> DeviceReceipt:
        return DeviceReceipt(self.request, self.result, self.device_sig, self.edge_sig)


def _addr(account: LocalAccount) -> bytes:
    return bytes.fromhex(account.address[2:])


def _sign(
    world: LedgerWorld, device: LocalAccount, edge: LocalAccount, n: int, seq: int,
    deadline: int, output: bytes = b"out",
) -> Signed:  # fmt: skip
    domain = world.ledger.domain
    input_c = keccak256(b"input" + n.to_bytes(4, "big"))
    request = TaskRequest(
        task_id_for(_addr(device), input_c), _addr(device), n, keccak256(b"model"), 3, input_c,
        _addr(edge), deadline,
    )  # fmt: skip
    result = TaskResult(
        request.task_id, request.struct_hash(), keccak256(output), world.measurement,
        world.quote_id, 0, 7, seq,
    )  # fmt: skip
    return Signed(
        request, request.sign(bytes(device.key), domain), result, world.sign(edge, result)
    )


async def _anchor(world: LedgerWorld, edge: LocalAccount, signed: list[Signed]) -> int:
    ledger = world.ledger
    state = await ledger.edge_state(edge.address)
    records = [AnchoredRecord(s.request, s.result, s.device_sig) for s in signed]
    assert [r.result.edge_seq for r in records] == list(
        range(state.next_seq, state.next_seq + len(records))
    )
    data = encode_batch(BatchRecords(_addr(edge), state.next_seq, tuple(records)))
    tree = world.tree([r.result for r in records])
    await ledger.anchor_batch(
        edge, state.next_batch_id, tree.root, state.next_seq, len(records), state.head, data
    )
    return int(state.next_batch_id)


@pytest.fixture
async def world() -> AsyncIterator[LedgerWorld]:
    async with open_ledger("inprocess") as ledger:
        yield await ledger_world(ledger, edges=2, devices=2, seed=5)


async def _index(world: LedgerWorld, receipts: list[DeviceReceipt] | None = None) -> AuditIndex:
    index = AuditIndex(":memory:", world.ledger.domain)
    await index.sync(world.ledger, [e.address for e in world.edges])
    if receipts:
        index.add_receipts(receipts)
    return index


def _codes(index: AuditIndex, signed: Signed) -> list[str]:
    (task,) = index.show(signed.request.task_id, signed.request.device)
    return [str(f.code) for f in task.findings]


async def _honest(world: LedgerWorld) -> tuple[list[Signed], list[Signed]]:
    """Two edges, each anchoring what it signed; returns (edge0's, edge1's) tasks."""
    a, b = world.devices
    edge0, edge1 = world.edges
    far = await world.ledger.timestamp() + 600
    first = [_sign(world, a, edge0, 1, 0, far), _sign(world, b, edge0, 2, 1, far)]
    second = [_sign(world, a, edge1, 3, 0, far)]
    await _anchor(world, edge0, first)
    await _anchor(world, edge1, second)
    return first, second


async def test_honest_challenges_refusals_and_receipts_give_no_finding(world: LedgerWorld) -> None:
    first, second = await _honest(world)
    a, b = world.devices
    ledger = world.ledger
    # a challenge of what was anchored, answered; a refusal of a request never anchored
    challenge_id = await ledger.challenge(a, first[0].result, first[0].edge_sig)
    tree = world.tree([s.result for s in first])
    await ledger.respond_challenge(world.edges[0], challenge_id, 0, tree.proof(0))
    never = _sign(world, b, world.edges[1], 9, 5, await ledger.timestamp() + 10)
    refused = await ledger.challenge_request(b, never.request, never.device_sig)
    digest = refusal_digest(ledger.domain, never.request.struct_hash(), REFUSAL_NOT_RECEIVED)
    await ledger.refuse_request(
        world.edges[1],
        refused,
        REFUSAL_NOT_RECEIVED,
        sign_digest(bytes(world.edges[1].key), digest),
    )
    receipts = [s.receipt() for s in (*first, *second)]
    with await _index(world, receipts) as index:
        assert all(not t.findings for t in index.tasks())
        assert index.receipt_omissions(await ledger.timestamp() + 10**6) == []
        assert index.batch_findings() == []


async def test_an_edge_that_anchors_another_result_than_it_signed_to_a_challenger(
    world: LedgerWorld,
) -> None:
    a, _ = world.devices
    edge0 = world.edges[0]
    far = await world.ledger.timestamp() + 600
    shown = _sign(world, a, edge0, 1, 0, far, output=b"what the device got")
    anchored = _sign(world, a, edge0, 1, 0, far, output=b"what the edge anchored")
    other = _sign(world, a, edge0, 2, 1, far)
    await _anchor(world, edge0, [anchored, other])
    challenge_id = await world.ledger.challenge(a, shown.result, shown.edge_sig)
    with await _index(world) as index:
        assert _codes(index, anchored) == ["challenge-equivocation"]
        (task,) = index.show(anchored.request.task_id)
        (finding,) = task.findings
        assert f"in challenge {challenge_id}" in finding.message
        assert shown.result.digest(world.ledger.domain).hex() in finding.message
        assert (finding.edge, finding.seq) == (_addr(edge0), 0)
        assert _codes(index, other) == []  # the rest of the edge's tasks are untouched
        # verification of the record still holds: the finding is data
        (verified,) = await index.verify(anchored.request.task_id, world.ledger)
        assert [str(f.code) for f in verified.findings] == ["challenge-equivocation"]


async def test_the_challenge_may_come_before_the_batch_and_sync_resumes(world: LedgerWorld) -> None:
    a, _ = world.devices
    edge0 = world.edges[0]
    far = await world.ledger.timestamp() + 600
    shown = _sign(world, a, edge0, 1, 0, far, output=b"shown")
    anchored = _sign(world, a, edge0, 1, 0, far, output=b"anchored")
    index = await _index(world)
    await world.ledger.challenge(a, shown.result, shown.edge_sig)
    await index.sync(world.ledger, [e.address for e in world.edges])
    await _anchor(world, edge0, [anchored])
    await index.sync(world.ledger, [e.address for e in world.edges])
    with index:
        assert _codes(index, anchored) == ["challenge-equivocation"]


async def test_an_edge_that_signs_a_refusal_for_a_request_it_answered(world: LedgerWorld) -> None:
    first, _ = await _honest(world)
    a, _ = world.devices
    edge0 = world.edges[0]
    ledger = world.ledger
    answered = first[0]
    challenge_id = await ledger.challenge_request(a, answered.request, answered.device_sig)
    digest = refusal_digest(ledger.domain, answered.request.struct_hash(), REFUSAL_NOT_RECEIVED)
    await ledger.refuse_request(
        edge0, challenge_id, REFUSAL_NOT_RECEIVED, sign_digest(bytes(edge0.key), digest)
    )
    with await _index(world) as index:
        assert _codes(index, answered) == ["refusal-equivocation"]
        (task,) = index.show(answered.request.task_id, answered.request.device)
        assert "reason 1: never received" in task.findings[0].message
        assert _codes(index, first[1]) == []


async def test_a_receipt_whose_result_differs_from_the_anchored_record(world: LedgerWorld) -> None:
    a, b = world.devices
    edge0 = world.edges[0]
    far = await world.ledger.timestamp() + 600
    kept = _sign(world, a, edge0, 1, 0, far, output=b"the device's")
    anchored = _sign(world, a, edge0, 1, 0, far, output=b"the edge's")
    # the same request answered again at another seq, differently from the receipt
    moved_receipt = _sign(world, b, edge0, 2, 1, far, output=b"receipt at 1")
    moved = _sign(world, b, edge0, 2, 2, far, output=b"anchored at 2")
    filler = _sign(world, a, edge0, 3, 1, far)
    await _anchor(world, edge0, [anchored, filler, moved])
    with await _index(world) as index:
        assert _codes(index, anchored) == []  # nothing without the receipts
    receipts = parse_receipts(
        encode_receipts(world.ledger.domain, [kept.receipt(), moved_receipt.receipt()]),
        world.ledger.domain,
    )
    with await _index(world, receipts) as index:
        assert _codes(index, anchored) == ["receipt-equivocation"]
        assert _codes(index, moved) == ["receipt-equivocation"]
        (task,) = index.show(moved.request.task_id, moved.request.device)
        assert "for this request at seq 1" in task.findings[0].message
        # seq 1 holds another device's task the receipt's edge signed for seq 1 elsewhere
        assert _codes(index, filler) == ["receipt-equivocation"]
        # every receipt's seq is anchored: no omission
        assert index.receipt_omissions(await world.ledger.timestamp() + 10**6) == []


async def test_a_receipt_whose_task_was_never_anchored(world: LedgerWorld) -> None:
    first, _ = await _honest(world)
    a, _ = world.devices
    edge0 = world.edges[0]
    deadline = await world.ledger.timestamp() + 60
    missing = _sign(world, a, edge0, 7, 2, deadline)
    with await _index(world, [missing.receipt(), first[0].receipt()]) as index:
        assert index.receipt_omissions(deadline + index.grace_seconds) == []  # window open
        ((receipt, finding),) = index.receipt_omissions(deadline + index.grace_seconds + 1)
        assert receipt == missing.receipt()
        assert finding.code == FindingCode.RECEIPT_OMISSION
        assert (finding.edge, finding.batch_id, finding.seq) == (_addr(edge0), -1, 2)
        assert "anchored no record there" in finding.message


async def test_a_forged_receipt_is_an_error_not_a_finding(world: LedgerWorld) -> None:
    """A hostile receipts file cannot frame an honest edge: a result not signed by the edge
    the request names (signed by another edge, or by an unknown key) is rejected."""
    first, _ = await _honest(world)
    a, _ = world.devices
    edge1 = world.edges[1]
    honest = first[0]
    framed = TaskResult(
        honest.result.task_id, honest.result.request_hash, keccak256(b"framed"),
        honest.result.measurement, honest.result.quote_id, 0, 7, honest.result.edge_seq,
    )  # fmt: skip
    domain = world.ledger.domain
    for signer in (edge1, a):  # another edge's key, the device's own key
        forged = DeviceReceipt(
            honest.request, framed, honest.device_sig, framed.sign(bytes(signer.key), domain)
        )
        with pytest.raises(SignatureError, match="receipt 1: the result is not signed by"):
            parse_receipts(encode_receipts(domain, [honest.receipt(), forged]), domain)
    # a request the device did not sign
    bad_request = DeviceReceipt(honest.request, honest.result, honest.edge_sig, honest.edge_sig)
    with pytest.raises(SignatureError, match="receipt 0: the request is not signed"):
        parse_receipts(encode_receipts(domain, [bad_request]), domain)
    with await _index(world) as index:  # the honest edge anchored exactly what it signed
        assert _codes(index, honest) == []


async def test_listing_many_tasks_finds_what_single_lookups_find(world: LedgerWorld) -> None:
    """Over 256 tasks the index reads claims in bulk: the same findings as one by one."""
    edge1 = world.edges[1]
    domain = world.ledger.domain
    entries = sample_tasks(
        300, edge_key=bytes(edge1.key), domain=domain, devices=2, seed=4,
        measurement=world.measurement, quote_id=world.quote_id,
    )  # fmt: skip
    records = tuple(e.anchored() for e in entries)
    data = encode_batch(BatchRecords(_addr(edge1), 0, records))
    tree = world.tree([r.result for r in records])
    await world.ledger.anchor_batch(edge1, 0, tree.root, 0, len(records), bytes(32), data)
    a = world.devices[0]
    for seq in (7, 250):
        other = replace(entries[seq].result, output_commitment=keccak256(b"other"))
        await world.ledger.challenge(a, other, world.sign(edge1, other))
    moved = replace(entries[120].result, output_commitment=keccak256(b"receipt"))
    receipts = [
        DeviceReceipt(
            entries[120].request, moved, entries[120].device_sig, world.sign(edge1, moved)
        ),
        *(DeviceReceipt(e.request, e.result, e.device_sig, e.edge_sig) for e in entries[:5]),
    ]
    with await _index(world, receipts) as index:
        listed = index.tasks()
        assert len(listed) == 300
        assert [t.findings for t in listed] == [index.findings(t) for t in listed]
        flagged = {
            t.record.result.edge_seq: sorted(
                str(f.code) for f in t.findings if "equivocation" in f.code
            )
            for t in listed
        }
        assert {s: c for s, c in flagged.items() if c} == {
            7: ["challenge-equivocation"],
            120: ["receipt-equivocation"],
            250: ["challenge-equivocation"],
        }


async def test_a_challenged_result_for_the_same_request_at_another_seq(world: LedgerWorld) -> None:
    """The enclave signed a result of a request for seq 5 (a device challenged with it) and
    anchored another result of that request at seq 0: the anchored record's finding names
    the request (read from the challenge's calldata), not only the sequence number."""
    a, _ = world.devices
    edge0 = world.edges[0]
    far = await world.ledger.timestamp() + 600
    anchored = _sign(world, a, edge0, 1, 0, far, output=b"anchored")
    shown = _sign(world, a, edge0, 1, 5, far, output=b"shown")
    await _anchor(world, edge0, [anchored])
    await world.ledger.challenge(a, shown.result, shown.edge_sig)
    with await _index(world) as index:
        (task,) = index.show(anchored.request.task_id)
        (finding,) = task.findings
        assert finding.code == FindingCode.CHALLENGE_EQUIVOCATION
        assert "for this request at seq 5" in finding.message


def test_challenge_calldata_is_read_only_from_a_direct_call() -> None:
    domain = LedgerDomain(31337, b"\x42" * 20)
    result = TaskResult(*(keccak256(bytes([i])) for i in range(5)), 0, 7, 3)
    args = abi_encode(
        ["(bytes32,bytes32,bytes32,bytes32,bytes32,uint8,uint32,uint64)", "bytes"],
        [tuple(getattr(result, f) for f in TaskResult.__slots__), b"\x01" * 65],
    )
    data = (
        keccak256(
            b"challenge((bytes32,bytes32,bytes32,bytes32,bytes32,uint8,uint32,uint64),bytes)"
        )[:4]
        + args
    )
    to, digest = "0x" + "42" * 20, result.digest(domain)
    assert challenged_request(to, data, domain, digest) == result.request_hash
    assert challenged_request(to.upper().replace("0X", "0x"), data, domain, digest)
    assert challenged_request("0x" + "43" * 20, data, domain, digest) == b""
    assert challenged_request(None, data, domain, digest) == b""
    assert challenged_request(to, b"\x00" * 4 + args, domain, digest) == b""
    assert challenged_request(to, data[:40], domain, digest) == b""
    assert challenged_request(to, data, domain, keccak256(b"another record")) == b""


async def test_hostile_sequence_numbers_and_bad_batches_block_nothing(world: LedgerWorld) -> None:
    """A Byzantine edge signs a result for seq 2^64-1 (a device files it in a challenge and
    holds it as a receipt) and publishes a batch that does not decode: the audit goes on,
    the receipt of the bad batch's seq is no omission (the batch finding stands), and the
    impossible seq is an omission of the edge."""
    a, b = world.devices
    edge0 = world.edges[0]
    far = await world.ledger.timestamp() + 60
    in_bad = _sign(world, a, edge0, 1, 0, far)
    state = await world.ledger.edge_state(edge0.address)
    tree = world.tree([in_bad.result])
    await world.ledger.anchor_batch(
        edge0, 0, tree.root, 0, 1, state.head, b"\x02 not a batch"
    )  # a batch finding against edge0
    shown = _sign(world, a, edge0, 2, 1, far, output=b"shown")
    anchored = _sign(world, a, edge0, 2, 1, far, output=b"anchored")
    await _anchor(world, edge0, [anchored])
    impossible = _sign(world, b, edge0, 3, (1 << 64) - 1, far)
    await world.ledger.challenge(b, impossible.result, impossible.edge_sig)
    await world.ledger.challenge(a, shown.result, shown.edge_sig)
    with await _index(world, [in_bad.receipt(), impossible.receipt()]) as index:
        assert [str(f.code) for f in index.batch_findings()] == ["batch-malformed"]
        assert _codes(index, anchored) == ["challenge-equivocation"]
        omissions = index.receipt_omissions(far + index.grace_seconds + 1)
        assert [(r.result.edge_seq, f.seq) for r, f in omissions] == [((1 << 64) - 1,) * 2]
