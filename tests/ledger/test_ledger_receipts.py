"""Device receipts: inclusion against the on-chain root, storage, challenges of omissions."""

from __future__ import annotations

import asyncio
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from eth_account import Account
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.exceptions import ContractRevertError, ProofError, RecordError, SignatureError
from secure_ci.ledger._anchor import Anchorer
from secure_ci.ledger._calldata import BatchRecords, encode_batch
from secure_ci.ledger._journal import Journal
from secure_ci.ledger._receipts import Receipt, ReceiptBook, find_receipt
from secure_ci.ledger._records import keccak256
from secure_ci.testing import MemoryLedger, sample_tasks

EDGE_KEY = keccak256(b"edge")
EDGE = Account.from_key(EDGE_KEY)
DEVICE = Account.from_key(keccak256(b"device-key" + bytes(8) + b"\x00"))


async def _anchored(tmp_path: Path, n: int = 12) -> tuple[MemoryLedger, Journal, Anchorer]:
    ledger = MemoryLedger()
    ledger.register_edge(EDGE, b"\x11" * 32)
    ledger.register_device(DEVICE)
    journal = Journal.open(tmp_path / "edge.db", edge=bytes.fromhex(EDGE.address[2:]))
    journal.append_many(sample_tasks(n, edge_key=EDGE_KEY, domain=ledger.domain))
    anchorer = Anchorer(journal, ledger, EDGE, max_records=5)
    await anchorer.flush()
    return ledger, journal, anchorer


async def test_receipt_of_anchored_task(tmp_path: Path) -> None:
    ledger, journal, _ = await _anchored(tmp_path)
    e = journal.entries(7, 1)[0]
    receipt = await find_receipt(
        ledger, ledger.domain, e.request, e.result, e.device_sig, e.edge_sig
    )
    assert receipt is not None
    assert receipt.batch_id == 1
    receipt.verify()
    assert Receipt.decode(receipt.encode()) == receipt
    assert receipt.domain == ledger.domain


async def test_a_bad_published_device_signature_is_caught_by_the_device(tmp_path: Path) -> None:
    """Device signatures are not under the Merkle root: the device checks them like auditors."""
    ledger, journal, _ = await _anchored(tmp_path, n=10)
    entries = journal.entries(5, 5)  # batch 1: devices 1,2,3,0,1 -> record 5 rides on 9
    covered, cover = entries[0], entries[4]
    records = [e.anchored() for e in entries]
    forged = replace(records[4], device_sig=entries[1].device_sig)  # another request's
    batch = BatchRecords(journal.edge, 5, (*records[:4], forged))
    ledger.edges[journal.edge].calldata[1] = encode_batch(batch)
    for e in (covered, cover):
        with pytest.raises(ProofError, match="device signature"):
            await find_receipt(ledger, ledger.domain, e.request, e.result, e.device_sig, e.edge_sig)
    untouched = entries[1]
    assert await find_receipt(
        ledger, ledger.domain, untouched.request, untouched.result, untouched.device_sig,
        untouched.edge_sig,
    ) is not None  # fmt: skip


async def test_omitting_edge_is_challenged_and_omission_recorded(tmp_path: Path) -> None:
    ledger, journal, _ = await _anchored(tmp_path, n=10)
    # the edge acknowledges task 10 to the device, then never anchors it
    (omitted,) = sample_tasks(1, edge_key=EDGE_KEY, domain=ledger.domain, first_seq=10)
    anchored = journal.entries(0, 1)[0]  # signed by DEVICE (device index 0)
    book = ReceiptBook(ledger, ledger.domain, DEVICE, grace_seconds=60)
    book.track(anchored.request, anchored.result, anchored.device_sig, anchored.edge_sig)
    book.track(omitted.request, omitted.result, omitted.device_sig, omitted.edge_sig)
    assert await book.check(now=omitted.request.deadline) == []
    assert list(book.receipts) == [anchored.request.task_id]
    (cid,) = await book.check(now=omitted.request.deadline + 61)
    assert await book.check(now=omitted.request.deadline + 62) == []  # challenged once
    with pytest.raises(ContractRevertError):
        await ledger.finalize_challenge(DEVICE, cid)  # window still open
    ledger.now += ledger.window + 1
    await ledger.finalize_challenge(DEVICE, cid)
    assert (await ledger.edge_state(EDGE.address)).omissions == 1


async def test_a_challenge_sent_before_a_crash_is_found_not_refused(tmp_path: Path) -> None:
    ledger, _, _ = await _anchored(tmp_path, n=10)
    omitted = sample_tasks(2, edge_key=EDGE_KEY, domain=ledger.domain, first_seq=10)
    sent = await ledger.challenge(DEVICE, omitted[0].result, omitted[0].edge_sig)  # then: crash
    book = ReceiptBook(ledger, ledger.domain, DEVICE, grace_seconds=60)  # after the restart
    for e in omitted:
        book.track(e.request, e.result, e.device_sig, e.edge_sig)
    late = max(e.request.deadline for e in omitted) + 61
    challenged = await book.check(now=late)
    assert challenged[0] == sent
    assert len(set(challenged)) == 2  # the other task is challenged as usual
    assert await book.check(now=late + 1) == []
    with pytest.raises(ContractRevertError, match="ChallengeExists"):
        await ledger.challenge(DEVICE, omitted[0].result, omitted[0].edge_sig)


async def test_answered_challenge_is_resolved(tmp_path: Path) -> None:
    ledger, journal, _ = await _anchored(tmp_path, n=10)
    e = journal.entries(3, 1)[0]
    receipt = await find_receipt(
        ledger, ledger.domain, e.request, e.result, e.device_sig, e.edge_sig
    )
    assert receipt is not None
    cid = await ledger.challenge(DEVICE, e.result, e.edge_sig)
    await ledger.respond_challenge(EDGE, cid, receipt.batch_id, list(receipt.proof))
    ledger.now += ledger.window + 1
    with pytest.raises(ContractRevertError):
        await ledger.finalize_challenge(DEVICE, cid)
    assert (await ledger.edge_state(EDGE.address)).omissions == 0


async def test_track_rejects_bad_signatures_and_pending_is_none(tmp_path: Path) -> None:
    ledger, journal, _ = await _anchored(tmp_path, n=5)
    e = journal.entries(0, 1)[0]
    book = ReceiptBook(ledger, ledger.domain, DEVICE)
    with pytest.raises(SignatureError):
        book.track(e.request, e.result, e.device_sig, e.device_sig)
    with pytest.raises(SignatureError):
        book.track(e.request, e.result, e.edge_sig, e.edge_sig)
    (later,) = sample_tasks(1, edge_key=EDGE_KEY, domain=ledger.domain, first_seq=5)
    found = await find_receipt(
        ledger, ledger.domain, later.request, later.result, later.device_sig, later.edge_sig
    )
    assert found is None
    # a different record at an anchored sequence number is evidence, not a receipt
    (forged,) = sample_tasks(1, edge_key=EDGE_KEY, domain=ledger.domain, first_seq=2, seed=3)
    with pytest.raises(ProofError):
        await find_receipt(
            ledger, ledger.domain, forged.request, forged.result, forged.device_sig, forged.edge_sig
        )


async def test_tampered_receipts_fail(tmp_path: Path) -> None:
    ledger, journal, _ = await _anchored(tmp_path)
    e = journal.entries(7, 1)[0]
    receipt = await find_receipt(
        ledger, ledger.domain, e.request, e.result, e.device_sig, e.edge_sig
    )
    assert receipt is not None
    bad_proof = replace(receipt, proof=(b"\x00" * 32, *receipt.proof[1:]))
    with pytest.raises(ProofError):
        bad_proof.verify()
    with pytest.raises(SignatureError):
        replace(receipt, edge_sig=receipt.device_sig).verify()
    with pytest.raises(RecordError):
        replace(receipt, result=replace(receipt.result, request_hash=b"\x00" * 32)).verify()


def _valid_receipt_bytes() -> bytes:
    async def make() -> bytes:
        with tempfile.TemporaryDirectory() as d:
            ledger, journal, _ = await _anchored(Path(d), n=6)
            e = journal.entries(2, 1)[0]
            r = await find_receipt(
                ledger, ledger.domain, e.request, e.result, e.device_sig, e.edge_sig
            )
            journal.close()
            assert r is not None
            return r.encode()

    return asyncio.run(make())


VALID = _valid_receipt_bytes()


@given(st.binary(max_size=600))
def test_receipt_decoder_rejects_garbage(data: bytes) -> None:
    try:
        Receipt.decode(data)
    except RecordError:
        return
    assert Receipt.decode(data).encode() == data


def test_receipt_decoder_mutation_fuzz() -> None:
    rng = random.Random(11)
    for _ in range(400):
        data = bytearray(VALID)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            Receipt.decode(bytes(data))
        except RecordError:
            continue
    with pytest.raises(RecordError):
        Receipt.decode(VALID[:-1])
    with pytest.raises(RecordError):
        Receipt.decode(b"\x00" * 9000)


async def test_book_collects_every_anchored_task_of_a_device(tmp_path: Path) -> None:
    ledger, journal, _ = await _anchored(tmp_path, n=12)
    book = ReceiptBook(ledger, ledger.domain, DEVICE)
    mine = [
        e for e in journal.entries(0, 12) if e.request.device == bytes.fromhex(DEVICE.address[2:])
    ]
    for e in mine:
        book.track(e.request, e.result, e.device_sig, e.edge_sig)
    assert await book.check(now=0) == []
    assert sorted(book.receipts) == sorted(e.request.task_id for e in mine)
    assert book.pending == {}
    for receipt in book.receipts.values():
        receipt.verify()


async def test_garbage_calldata_cannot_stop_the_device_from_challenging(tmp_path: Path) -> None:
    ledger, journal, _ = await _anchored(tmp_path, n=10)
    e = journal.entries(0, 1)[0]
    book = ReceiptBook(ledger, ledger.domain, DEVICE, grace_seconds=60)
    book.track(e.request, e.result, e.device_sig, e.edge_sig)

    async def garbage(_edge: object, _batch_id: int) -> bytes:
        return b"garbage"

    ledger.batch_calldata = garbage  # type: ignore[method-assign]  # a malicious edge's batch
    # before the deadline: the task is anchored wrongly, so it is challenged at once
    (cid,) = await book.check(now=e.request.deadline - 1)
    assert book.receipts == {}
    assert await book.check(now=e.request.deadline + 61) == []  # and only once
    assert cid >= 0
