"""Audit: index from anchoring calldata, queries, verification and its failure modes."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from eth_account import Account

from secure_ci.exceptions import (
    ConfigError,
    ContractRevertError,
    LedgerError,
    ProofError,
    RecordError,
    SignatureError,
)
from secure_ci.ledger._anchor import Anchorer
from secure_ci.ledger._audit import AuditIndex
from secure_ci.ledger._audit_store import proof_from_blob
from secure_ci.ledger._calldata import BatchRecords, decode_batch, encode_batch
from secure_ci.ledger._journal import Journal
from secure_ci.ledger._merkle import MerkleTree, leaf_hash
from secure_ci.ledger._receipts import ReceiptBook, find_receipt
from secure_ci.ledger._records import keccak256
from secure_ci.testing import MemoryLedger, sample_tasks

EDGE_KEY = keccak256(b"edge")
EDGE = Account.from_key(EDGE_KEY)
EDGE_BYTES = bytes.fromhex(EDGE.address[2:])


async def _ledger(tmp_path: Path, n: int = 23) -> tuple[MemoryLedger, Journal]:
    ledger = MemoryLedger()
    ledger.register_edge(EDGE, b"\x11" * 32)
    journal = Journal.open(tmp_path / "edge.db", edge=EDGE_BYTES)
    journal.append_many(sample_tasks(n, edge_key=EDGE_KEY, domain=ledger.domain))
    await Anchorer(journal, ledger, EDGE, max_records=8).flush()
    return ledger, journal


def test_proof_from_blob_matches_tree() -> None:
    for n in (1, 2, 3, 7, 8, 13):
        leaves = [keccak256(bytes([i])) for i in range(n)]
        tree = MerkleTree.build(leaves)
        blob = b"".join(b"".join(level) for level in tree.levels)
        for i in range(n):
            assert proof_from_blob(blob, n, i) == tree.proof(i)


async def test_sync_query_verify(tmp_path: Path) -> None:
    ledger, journal = await _ledger(tmp_path)
    with AuditIndex(tmp_path / "index.db", ledger.domain) as index:
        assert await index.sync(ledger, [EDGE.address]) == 23
        assert await index.sync(ledger, [EDGE.address]) == 0
        assert index.count() == 23
        e = journal.entries(17, 1)[0]
        (shown,) = index.show(e.request.task_id)
        assert shown.record.result == e.result
        assert shown.batch_id == 2
        assert shown.as_json()["edge_seq"] == 17
        (verified,) = await index.verify(e.request.task_id, ledger)
        assert verified.record_hash == e.record_hash
        (offline,) = await index.verify(e.request.task_id, None)
        assert offline == verified
        device = e.request.device
        assert all(t.record.request.device == device for t in index.tasks(device=device))
        assert len(index.tasks(device=device)) == 6
        assert len(index.tasks(edge=EDGE_BYTES, limit=5)) == 5
        since = e.request.deadline
        assert len(index.tasks(since=since, until=since + 3)) == 3
        assert index.tasks(model=b"\x00" * 32) == []
        with pytest.raises(RecordError):
            await index.verify(b"\x00" * 32, ledger)


async def test_tampered_record_proof_signature_fail(tmp_path: Path) -> None:
    ledger, journal = await _ledger(tmp_path)
    index = AuditIndex(":memory:", ledger.domain)
    await index.sync(ledger, [EDGE_BYTES])
    (task,) = index.show(journal.entries(5, 1)[0].request.task_id)
    await index.verify_task(task, ledger)
    rec = task.record
    tampered = replace(rec, result=replace(rec.result, output_commitment=b"\x00" * 32))
    with pytest.raises(ProofError):
        await index.verify_task(replace(task, record=tampered), ledger)
    other = journal.entries(6, 1)[0].device_sig
    with pytest.raises(SignatureError):
        await index.verify_task(replace(task, record=replace(rec, device_sig=other)), ledger)
    with pytest.raises(ProofError):  # claims another batch
        await index.verify_task(replace(task, batch_id=1), ledger)
    with pytest.raises(ProofError):
        await index.verify_task(replace(task, record=tampered), None)
    # a corrupted proof in the index
    index._conn.execute("UPDATE batches SET nodes = zeroblob(length(nodes)) WHERE batch_id = 0")
    with pytest.raises(ProofError):
        await index.verify_task(task, ledger)
    # the edge re-registers with a new measurement: its anchored history stays valid
    index2 = AuditIndex(":memory:", ledger.domain)
    await index2.sync(ledger, [EDGE_BYTES])
    ledger.edges[EDGE_BYTES].measurement = b"\x99" * 32
    await index2.verify(task.record.request.task_id, ledger)
    # but a record whose measurement is not the one anchored with its batch fails
    batches = ledger.edges[EDGE_BYTES].batches
    batches[0] = replace(batches[0], measurement=b"\x99" * 32)
    with pytest.raises(SignatureError, match="anchored with its batch"):
        await index2.verify(task.record.request.task_id, ledger)
    index2._conn.execute("UPDATE batches SET measurement = zeroblob(32) WHERE batch_id = 0")
    with pytest.raises(SignatureError, match="anchored with its batch"):
        await index2.verify(task.record.request.task_id, None)


async def test_calldata_that_disagrees_with_the_root_is_a_finding(tmp_path: Path) -> None:
    ledger, journal = await _ledger(tmp_path, n=24)
    # the edge publishes a root over other records than its calldata shows
    batch = decode_batch(await ledger.batch_calldata(EDGE.address, 0))
    records = list(batch.records)
    records[2] = replace(
        records[2], result=replace(records[2].result, output_commitment=b"\x01" * 32)
    )
    ledger.edges[EDGE_BYTES].calldata[0] = encode_batch(BatchRecords(EDGE_BYTES, 0, tuple(records)))
    index = AuditIndex(":memory:", ledger.domain)
    assert await index.sync(ledger, [EDGE_BYTES]) == 16  # refused when indexed; the rest is
    (finding,) = index.batch_findings()
    assert (finding.code, finding.batch_id, finding.seq) == ("batch-root-mismatch", 0, -1)
    assert "do not rebuild the anchored Merkle root" in finding.message
    assert finding.as_json()["edge"] == "0x" + EDGE_BYTES.hex()
    with pytest.raises(RecordError, match="not in the index"):
        await index.verify(records[2].request.task_id, ledger)
    later = journal.entries(9, 1)[0]
    (verified,) = await index.verify(later.request.task_id, ledger)
    # its chain began in the batch that was not indexed: the auditor sees a gap, not a failure
    assert [f.code for f in verified.findings] == ["request-chain-gap"]
    with pytest.raises(ProofError, match="do not rebuild the anchored Merkle root"):
        index.add_batch(
            EDGE_BYTES, 0, (await ledger.batch(EDGE.address, 0)).root, 1,
            ledger.edges[EDGE_BYTES].calldata[0], b"\x11" * 32,
        )  # fmt: skip
    info = await ledger.batch(EDGE.address, 0)
    with pytest.raises(ProofError, match="records"):  # calldata beyond the anchored range
        index.add_batch(
            EDGE_BYTES, 0, info.root, 1, encode_batch(batch), b"\x11" * 32, count=info.count - 1
        )
    with pytest.raises(RecordError):
        index.add_batch(b"\x01" * 20, 9, b"\x00" * 32, 1, encode_batch(batch), b"\x11" * 32)


async def test_inprocess_chain_end_to_end(tmp_path: Path) -> None:
    """The real path: py-evm chain, the Solidity contract, anchorer, receipts, audit."""
    ledger_mod = pytest.importorskip("secure_ci.ledger")
    admin = Account.from_key(keccak256(b"admin"))
    device = Account.from_key(keccak256(b"device-key" + bytes(8) + b"\x00"))
    async with ledger_mod.open_ledger("inprocess") as ledger:
        for who in (admin, EDGE, device):
            await ledger.fund(who.address, 10**20)
        party = await ledger.register_party(admin.address)
        await ledger.allow_measurement(b"\x11" * 32)
        await ledger.register_edge(admin, party, EDGE, b"\x11" * 32, b"\x22" * 32, "e:1")
        await ledger.register_device(admin, party, device)
        domain = ledger.domain
        entries = sample_tasks(13, edge_key=EDGE_KEY, domain=domain)
        # the contract's EIP-712 hashing agrees with ours
        assert await ledger.hash_task_result(entries[0].result) == entries[0].record_hash
        journal = Journal.open(tmp_path / "edge.db", edge=EDGE_BYTES)
        journal.append_many(entries[:10])
        anchorer = Anchorer(journal, ledger, EDGE, max_records=4)
        receipts = await anchorer.flush()
        assert len(receipts) == 3
        # replayed and out-of-order anchors revert
        b0 = journal.batch(0)
        with pytest.raises(ContractRevertError):
            await ledger.anchor_batch(EDGE, 0, b0.root, 0, 4, b0.prev_head, b"")
        with pytest.raises(ContractRevertError):
            await ledger.anchor_batch(EDGE, 4, b0.root, 10, 4, journal.head, b"")
        # the device gets a receipt checked against the contract
        e = entries[6]
        receipt = await find_receipt(ledger, domain, e.request, e.result, e.device_sig, e.edge_sig)
        assert receipt is not None
        assert receipt.batch_id == 1
        # the auditor indexes the calldata and verifies against the chain
        index = AuditIndex(":memory:", domain)
        edges = {ev.edge for ev in await ledger.batches()}
        assert await index.sync(ledger, edges) == 10
        (verified,) = await index.verify(e.request.task_id, ledger)
        assert verified.root == journal.batch(1).root
        (task,) = index.show(e.request.task_id)
        bad = replace(task.record, result=replace(task.record.result, latency_ms=1))
        with pytest.raises(ProofError):
            await index.verify_task(replace(task, record=bad), ledger)
        # the edge acknowledges records 10..12 but never anchors them: challenge -> omission
        journal.append_many(entries[10:])
        omitted = entries[12]
        book = ReceiptBook(ledger, domain, device, grace_seconds=0)
        book.track(omitted.request, omitted.result, omitted.device_sig, omitted.edge_sig)
        (cid,) = await book.check(now=omitted.request.deadline + 1)
        await ledger.advance_time(await ledger.challenge_window() + 1)
        await ledger.finalize_challenge(device, cid)
        assert (await ledger.edge_state(EDGE.address)).omissions == 1
        # a restarted edge re-anchors exactly what the chain lacks
        journal.close()
        journal = Journal.open(tmp_path / "edge.db", edge=EDGE_BYTES)
        assert len(await Anchorer(journal, ledger, EDGE, max_records=4).flush()) == 1
        state = await ledger.edge_state(EDGE.address)
        assert (state.next_seq, state.head) == (13, journal.head)
        journal.close()


def test_an_index_of_an_older_format_is_refused(tmp_path: Path) -> None:
    domain = MemoryLedger().domain
    AuditIndex(tmp_path / "old.db", domain).close()
    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("DELETE FROM meta WHERE key = 'format'")
    with pytest.raises(LedgerError, match="older format"):
        AuditIndex(tmp_path / "old.db", domain)
    # format 2 (before findings): its tables lack the new columns; refused, never migrated
    with sqlite3.connect(tmp_path / "v2.db") as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        conn.execute("CREATE TABLE tasks (task_id BLOB NOT NULL)")
        value = domain.contract + domain.chain_id.to_bytes(32, "big")
        conn.execute("INSERT INTO meta VALUES ('domain', ?), ('format', ?)", (value, b"2"))
    for opened_with in (domain, None):
        with pytest.raises(LedgerError, match="older format: delete it to rebuild it"):
            AuditIndex(tmp_path / "v2.db", opened_with)
    with pytest.raises(ConfigError):
        AuditIndex(":memory:", domain, grace_seconds=-1)


async def test_every_task_verifies_through_its_request_chain(tmp_path: Path) -> None:
    ledger, _journal = await _ledger(tmp_path, n=80)
    with AuditIndex(":memory:", ledger.domain) as index:
        await index.sync(ledger, [EDGE.address])
        tasks = index.tasks(limit=100)
        unsigned = [t for t in tasks if not t.record.device_sig]
        # batches of 8 from 4 devices: the first of each device's two requests rides on the second
        assert len(unsigned) == len(tasks) // 2
        assert all(t.next_seq > t.record.result.edge_seq for t in unsigned)
        assert unsigned[0].as_json()["chain_next_seq"] == unsigned[0].next_seq
        assert unsigned[0].as_json().keys() == tasks[-1].as_json().keys()  # one CSV header
        for task in tasks:
            await index.verify_task(task, None)


async def test_a_changed_record_under_a_later_signature_fails_verify(tmp_path: Path) -> None:
    """An edge that anchors a record the device did not send, keeping its chain intact."""
    ledger, journal = await _ledger(tmp_path, n=8)
    entries = journal.entries(0, 8)
    records = [e.anchored() for e in entries]
    # record 1 is covered by record 5's signature; change its input but keep the chain hashes
    forged = replace(records[1].request, input_commitment=b"\x01" * 32)
    records[1] = replace(
        records[1],
        request=forged,
        result=replace(
            records[1].result, task_id=forged.task_id, request_hash=forged.struct_hash()
        ),
    )
    batch = BatchRecords(EDGE_BYTES, 0, tuple(records))
    tree = MerkleTree.build(
        [leaf_hash(r.result.edge_seq, r.result.digest(ledger.domain)) for r in records]
    )
    with AuditIndex(":memory:", ledger.domain) as index:
        index.add_batch(EDGE_BYTES, 0, tree.root, 1, encode_batch(batch), b"\x11" * 32)
        (task,) = index.show(forged.task_id)
        with pytest.raises(SignatureError):
            await index.verify_task(task, None)
        # a record whose covering request is missing from the index is refused too
        (honest,) = index.show(records[2].request.task_id)
        assert not honest.record.device_sig
        with pytest.raises(SignatureError, match="missing"):
            await index.verify_task(replace(honest, next_seq=-1), None)


async def test_a_task_replayed_many_times_costs_one_finding_per_record(tmp_path: Path) -> None:
    """A Byzantine edge anchors one signed request 600 times: every copy is flagged once,
    naming the earliest other copy (findings grow with the copies, not their square)."""
    ledger = MemoryLedger()
    ledger.register_edge(EDGE, b"\x11" * 32)
    (entry,) = sample_tasks(1, edge_key=EDGE_KEY, domain=ledger.domain, chained=False)
    for first, copies in ((0, 500), (500, 100)):
        records = tuple(
            replace(entry.anchored(), result=replace(entry.result, edge_seq=first + i))
            for i in range(copies)
        )
        tree = MerkleTree.build(
            [leaf_hash(r.result.edge_seq, r.result.digest(ledger.domain)) for r in records]
        )
        state = await ledger.edge_state(EDGE.address)
        await ledger.anchor_batch(
            EDGE, state.next_batch_id, tree.root, first, copies, state.head,
            encode_batch(BatchRecords(EDGE_BYTES, first, records)),
        )  # fmt: skip
    with AuditIndex(":memory:", ledger.domain) as index:
        assert await index.sync(ledger, [EDGE_BYTES]) == 600
        copies_found = index.show(entry.request.task_id)
        assert len(copies_found) == 600
        for task in copies_found:
            (finding,) = task.findings
            assert finding.code == "replayed-request"
            assert "the same signed request" in finding.message
        first_copy, later = copies_found[0], copies_found[-1]
        assert "also anchored at seq 1 of this edge" in first_copy.findings[0].message
        assert "also anchored at seq 0 of this edge" in later.findings[0].message
        (stored,) = index._conn.execute("SELECT COUNT(*) FROM findings").fetchone()
        assert stored == 600
        await index.verify_task(later, ledger)  # the device did sign it: verified, and flagged
