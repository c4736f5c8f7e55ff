"""The anchorer: batches by size and age, idempotent re-anchoring, epochs, reverts."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from secure_ci.edge._state import DevSealedStore, PlainSealedStore
from secure_ci.exceptions import ContractRevertError, JournalError, LedgerError, SecureCIError
from secure_ci.ledger._anchor import Anchorer
from secure_ci.ledger._calldata import BatchRecords, decode_batch, encode_batch
from secure_ci.ledger._epoch import AnchoredHead, EpochLink, EpochState, SealedEpochStore
from secure_ci.ledger._journal import Journal
from secure_ci.ledger._merkle import MerkleTree, chain_head, leaf_hash
from secure_ci.ledger._records import LedgerDomain, keccak256
from secure_ci.testing import MemoryLedger, sample_tasks

EDGE_KEY = keccak256(b"edge")
EDGE = Account.from_key(EDGE_KEY)
MEASUREMENT = b"\x11" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _setup(tmp_path: Path) -> tuple[MemoryLedger, Journal, LedgerDomain]:
    ledger = MemoryLedger()
    ledger.register_edge(EDGE, MEASUREMENT)
    journal = Journal.open(tmp_path / "edge.db", edge=bytes.fromhex(EDGE.address[2:]))
    return ledger, journal, ledger.domain


async def test_anchor_and_verify(tmp_path: Path) -> None:
    ledger, journal, domain = _setup(tmp_path)
    entries = sample_tasks(25, edge_key=EDGE_KEY, domain=domain)
    journal.append_many(entries)
    anchorer = Anchorer(journal, ledger, EDGE, max_records=10)
    receipts = await anchorer.flush()
    assert len(receipts) == 3
    state = await ledger.edge_state(EDGE.address)
    assert (state.next_batch_id, state.next_seq, state.head) == (3, 25, journal.head)
    batch = decode_batch(await ledger.batch_calldata(EDGE.address, 1))
    assert [r.result for r in batch.records] == [e.result for e in entries[10:20]]
    tree = MerkleTree.build([leaf_hash(e.result.edge_seq, e.record_hash) for e in entries[10:20]])
    e = entries[13]
    assert await ledger.verify_task(EDGE.address, 1, 13, e.record_hash, tree.proof(3))
    assert not await ledger.verify_task(EDGE.address, 1, 13, e.record_hash, tree.proof(4))
    assert await anchorer.flush() == []  # idempotent


async def test_due_by_size_and_age(tmp_path: Path) -> None:
    ledger, journal, domain = _setup(tmp_path)
    clock = Clock()
    anchorer = Anchorer(journal, ledger, EDGE, max_records=5, max_seconds=2.0, clock=clock)
    assert not anchorer.due()
    journal.append_many(sample_tasks(2, edge_key=EDGE_KEY, domain=domain))
    assert not anchorer.due()
    clock.now = 2.5
    assert anchorer.due()
    journal.append_many(sample_tasks(3, edge_key=EDGE_KEY, domain=domain, first_seq=2))
    clock.now = 0.0
    anchorer = Anchorer(journal, ledger, EDGE, max_records=5, max_seconds=2.0, clock=clock)
    assert anchorer.due()
    with pytest.raises(LedgerError):
        Anchorer(journal, ledger, EDGE, max_records=0)
    with pytest.raises(JournalError):
        Anchorer(journal, ledger, Account.from_key(keccak256(b"other")))


async def _until(condition: Any) -> None:
    for _ in range(2000):  # bounded: ~2 s
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached")


async def test_run_closes_whole_batches_until_the_rest_ages(tmp_path: Path) -> None:
    """Due by size, only full batches close (a transaction's cost is mostly fixed); the
    remainder waits for more records or for its age."""
    ledger, journal, domain = _setup(tmp_path)
    clock = Clock()
    anchorer = Anchorer(journal, ledger, EDGE, max_records=10, max_seconds=2.0, clock=clock)
    journal.append_many(sample_tasks(25, edge_key=EDGE_KEY, domain=domain))
    stop = asyncio.Event()
    task = asyncio.create_task(anchorer.run(poll_seconds=0.001, stop=stop))
    await _until(lambda: journal.batch_count == 2 and not journal.unanchored())
    await asyncio.sleep(0.01)
    assert (journal.batch_count, journal.pending) == (2, 5)
    clock.now = 5.0
    await _until(lambda: journal.pending == 0 and not journal.unanchored())
    journal.append_many(sample_tasks(3, edge_key=EDGE_KEY, domain=domain, first_seq=25))
    stop.set()
    await task  # stopping flushes the rest
    assert [journal.batch(b).count for b in range(4)] == [10, 10, 5, 3]
    assert (await ledger.edge_state(EDGE.address)).next_seq == 28


async def test_restart_reanchors_exactly_what_the_chain_lacks(tmp_path: Path) -> None:
    ledger, journal, domain = _setup(tmp_path)
    journal.append_many(sample_tasks(30, edge_key=EDGE_KEY, domain=domain))
    await Anchorer(journal, ledger, EDGE, max_records=10).flush()
    # a crash after the chain accepted batch 3 but before the journal recorded it
    journal.append_many(sample_tasks(20, edge_key=EDGE_KEY, domain=domain, first_seq=30))
    b3 = journal.close_batch(10)
    assert b3 is not None
    entries = journal.entries(30, 10)
    calldata = encode_batch(BatchRecords(journal.edge, 30, tuple(x.anchored() for x in entries)))
    await ledger.anchor_batch(EDGE, 3, b3.root, 30, 10, b3.prev_head, calldata)
    journal.close()
    journal = Journal.open(tmp_path / "edge.db", edge=journal.edge)
    anchorer = Anchorer(journal, ledger, EDGE, max_records=10)
    assert await anchorer.sync() == 0
    receipts = await anchorer.flush()
    assert len(receipts) == 1  # only batch 4 was missing
    state = await ledger.edge_state(EDGE.address)
    assert (state.next_batch_id, state.next_seq, state.head) == (5, 50, journal.head)


async def test_lost_chain_starts_a_linked_epoch(tmp_path: Path) -> None:
    ledger, journal, domain = _setup(tmp_path)
    journal.append_many(sample_tasks(30, edge_key=EDGE_KEY, domain=domain))
    anchorer = Anchorer(journal, ledger, EDGE, max_records=10)
    await anchorer.flush()
    old_head = journal.head
    ledger.wipe()
    assert await anchorer.sync() == 3
    assert anchorer.epoch == 1
    assert len(await anchorer.flush()) == 3
    state = await ledger.edge_state(EDGE.address)
    # the link is part of the first batch's records, so its head and those after it change
    assert (state.next_batch_id, state.head) == (3, journal.head)
    assert journal.head != old_head
    assert journal.batch(2).head == journal.head
    reopened = await anchorer.sync()
    assert reopened == 0
    first = decode_batch(await ledger.batch_calldata(EDGE.address, 0))
    assert first.epoch_link == (old_head, 0)
    assert decode_batch(await ledger.batch_calldata(EDGE.address, 1)).epoch_link is None


async def test_a_chain_that_loses_batches_twice_is_linked_twice(tmp_path: Path) -> None:
    # Epoch 1 links batch 2; the chain then loses from batch 1: batch 2 is anchored again
    # without its old link, and batch 1 carries the new one.
    ledger, journal, domain = _setup(tmp_path)
    journal.append_many(sample_tasks(40, edge_key=EDGE_KEY, domain=domain))
    anchorer = Anchorer(journal, ledger, EDGE, max_records=10)
    await anchorer.flush()
    first_head = journal.head
    ledger.rollback(2)
    assert await anchorer.sync() == 2
    assert len(await anchorer.flush()) == 2
    assert decode_batch(await ledger.batch_calldata(EDGE.address, 2)).epoch_link == (first_head, 0)
    second_head = journal.head
    ledger.rollback(1)
    assert await anchorer.sync() == 3
    assert anchorer.epoch == 2
    assert len(await anchorer.flush()) == 3
    links = [
        decode_batch(await ledger.batch_calldata(EDGE.address, b)).epoch_link for b in range(4)
    ]
    assert links == [None, (second_head, 1), None, None]
    state = await ledger.edge_state(EDGE.address)
    assert (state.next_batch_id, state.next_seq, state.head) == (4, 40, journal.head)


async def test_divergence_is_refused(tmp_path: Path) -> None:
    ledger, journal, domain = _setup(tmp_path)
    entries = sample_tasks(10, edge_key=EDGE_KEY, domain=domain)
    journal.append_many(entries)
    await Anchorer(journal, ledger, EDGE, max_records=5).flush()
    other = Journal.open(tmp_path / "other.db", edge=journal.edge)
    with pytest.raises(JournalError):
        await Anchorer(other, ledger, EDGE).sync()
    other.append_many(sample_tasks(10, edge_key=EDGE_KEY, domain=domain, seed=9))
    other.close_batch(5)
    other.close_batch(5)
    with pytest.raises(LedgerError):
        await Anchorer(other, ledger, EDGE).sync()
    unregistered = MemoryLedger()
    with pytest.raises(LedgerError):
        await Anchorer(journal, unregistered, EDGE).sync()


async def test_replayed_duplicated_out_of_order_anchors_revert(tmp_path: Path) -> None:
    ledger, journal, domain = _setup(tmp_path)
    journal.append_many(sample_tasks(10, edge_key=EDGE_KEY, domain=domain))
    await Anchorer(journal, ledger, EDGE, max_records=5).flush()
    b0, b1 = journal.batch(0), journal.batch(1)
    calls: list[tuple[Any, ...]] = [
        (0, b0.root, 0, 5, b0.prev_head),  # replay
        (1, b1.root, 5, 5, b1.prev_head),  # duplicate
        (3, b1.root, 10, 5, b1.head),  # gap
        (2, b1.root, 5, 5, b1.head),  # wrong first sequence
        (2, b1.root, 10, 5, b0.head),  # wrong previous head
        (2, b1.root, 10, 0, b1.head),  # empty
    ]
    for args in calls:
        with pytest.raises(ContractRevertError):
            await ledger.anchor_batch(EDGE, *args, b"")


async def test_run_loop_in_a_task_group(tmp_path: Path) -> None:
    ledger, journal, domain = _setup(tmp_path)
    anchorer = Anchorer(journal, ledger, EDGE, max_records=4, max_seconds=0.01)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(anchorer.run(poll_seconds=0.001, stop=stop))
        for i in range(0, 12, 3):
            journal.append_many(sample_tasks(3, edge_key=EDGE_KEY, domain=domain, first_seq=i))
            await asyncio.sleep(0.005)
        stop.set()
    state = await ledger.edge_state(EDGE.address)
    assert (state.next_seq, state.head) == (12, journal.head)
    assert journal.unanchored() == []


async def _register(ledger: Any, admin: Any) -> None:
    party = await ledger.register_party(admin.address)
    await ledger.allow_measurement(MEASUREMENT)
    await ledger.register_edge(admin, party, EDGE, MEASUREMENT, b"\x22" * 32, "e:1")


@pytest.mark.anvil
@pytest.mark.slow
async def test_anvil_killed_new_epoch_reanchors_everything(tmp_path: Path) -> None:
    """anvil loses its state on kill -9; the edge re-anchors the journal in a linked epoch."""
    ledger_mod = pytest.importorskip("secure_ci.ledger")
    if ledger_mod.find_anvil() is None:
        pytest.skip("anvil is not installed (npm ci in ledger/)")
    journal = Journal.open(tmp_path / "edge.db", edge=bytes.fromhex(EDGE.address[2:]))
    heads = []
    for round_ in range(2):
        with ledger_mod.run_anvil() as node:
            owner, admin = (Account.from_key(k) for k in node.keys[:2])
            async with ledger_mod.open_ledger(node.url, deployer=owner) as ledger:
                await ledger.fund(EDGE.address, 10**20)
                await _register(ledger, admin)
                if round_ == 0:
                    entries = sample_tasks(9, edge_key=EDGE_KEY, domain=ledger.domain)
                    journal.append_many(entries)
                anchorer = Anchorer(journal, ledger, EDGE, max_records=4)
                assert await anchorer.sync() == (0 if round_ == 0 else 3)
                assert len(await anchorer.flush()) == 3
                state = await ledger.edge_state(EDGE.address)
                heads.append(state.head)
                assert state.next_seq == 9
                first = decode_batch(await ledger.batch_calldata(EDGE.address, 0))
                assert (first.epoch_link is None) == (round_ == 0)
    # the new epoch's first batch carries the link in its records: its head chain differs
    assert heads[0] != heads[1] == journal.head
    journal.close()


async def test_appends_from_a_worker_thread_while_anchoring(tmp_path: Path) -> None:
    ledger, journal, domain = _setup(tmp_path)
    anchorer = Anchorer(journal, ledger, EDGE, max_records=7, max_seconds=0.01)
    stop = asyncio.Event()
    entries = sample_tasks(60, edge_key=EDGE_KEY, domain=domain)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(anchorer.run(poll_seconds=0.0005, stop=stop))
        for i in range(0, 60, 5):
            await asyncio.to_thread(journal.append_many, entries[i : i + 5])
        stop.set()
    state = await ledger.edge_state(EDGE.address)
    assert (state.next_seq, state.head) == (60, journal.head)


# --- the epoch state is sealed: the host, who writes the journal file, cannot choose it ---


class CrashingStore:
    """An epoch store whose process is killed while it saves the first state that is not
    epoch 0: just before the write or just after it reached the disk."""

    def __init__(self, inner: SealedEpochStore, *, saved: bool) -> None:
        self.inner = inner
        self.saved = saved

    def load(self) -> EpochState | None:
        return self.inner.load()

    def save(self, state: EpochState) -> None:
        if state.epoch == 0:
            self.inner.save(state)
            return
        if self.saved:
            self.inner.save(state)
        raise Killed


class Killed(BaseException):
    """kill -9 (nothing after it runs)."""


def _sealed(tmp_path: Path) -> SealedEpochStore:
    return SealedEpochStore(DevSealedStore(tmp_path / "sealed", MEASUREMENT))


async def _anchored_then_chain_lost(tmp_path: Path) -> tuple[MemoryLedger, Journal, bytes]:
    """30 records anchored in 3 batches (sealed epoch state), then the chain lost them."""
    ledger, journal, domain = _setup(tmp_path)
    journal.append_many(sample_tasks(30, edge_key=EDGE_KEY, domain=domain))
    await Anchorer(journal, ledger, EDGE, max_records=10, epoch_state=_sealed(tmp_path)).flush()
    ledger.wipe()
    return ledger, journal, journal.head


def _host_writes_meta(tmp_path: Path, values: dict[str, bytes]) -> None:
    with sqlite3.connect(tmp_path / "edge.db") as conn:
        for key, value in values.items():
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


async def test_forged_epoch_link_in_the_journal_meta_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger, journal, old_head = await _anchored_then_chain_lost(tmp_path)
    anchorer = Anchorer(journal, ledger, EDGE, max_records=10, epoch_state=_sealed(tmp_path))
    assert await anchorer.sync() == 3
    forged = b"\x66" * 32
    # after the chain restart, before anchoring: a link for batch 0 and one for batch 1
    _host_writes_meta(tmp_path, {"epoch_link": bytes(8) + forged + b"\x00\x00\x00\x07"})
    _host_writes_meta(tmp_path, {"epoch": (41).to_bytes(4, "big")})
    assert len(await anchorer.flush()) == 3
    first = decode_batch(await ledger.batch_calldata(EDGE.address, 0))
    assert first.epoch_link == (old_head, 0)
    # a restarted edge on the forged journal: another loss links to the true epoch 1 head
    head_1 = journal.head
    _host_writes_meta(tmp_path, {"epoch_link": (1).to_bytes(8, "big") + forged + bytes(4)})
    journal.close()
    journal = Journal.open(tmp_path / "edge.db", edge=journal.edge)
    ledger.wipe()
    with caplog.at_level(logging.WARNING, logger="secure_ci.ledger._anchor"):
        anchorer = Anchorer(journal, ledger, EDGE, max_records=10, epoch_state=_sealed(tmp_path))
        Anchorer(journal, ledger, EDGE, max_records=10, epoch_state=_sealed(tmp_path))
    assert sum("older edge: ignored" in r.message for r in caplog.records) == 1
    assert await anchorer.sync() == 3
    assert anchorer.epoch == 2
    await anchorer.flush()
    links = [
        decode_batch(await ledger.batch_calldata(EDGE.address, b)).epoch_link for b in range(3)
    ]
    assert links == [(head_1, 1), None, None]
    assert journal.get_meta("format") is not None  # the journal's own meta is untouched
    journal.close()


async def test_a_deleted_or_garbage_sealed_epoch_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Deleted (or an edge older than the sealed state): started again from the journal, with
    # a warning, which is no worse than the host putting back an old sealed file.
    ledger, journal, old_head = await _anchored_then_chain_lost(tmp_path)
    (tmp_path / "sealed" / "epoch").unlink()
    with caplog.at_level(logging.WARNING, logger="secure_ci.ledger._anchor"):
        anchorer = Anchorer(journal, ledger, EDGE, max_records=10, epoch_state=_sealed(tmp_path))
        assert await anchorer.sync() == 3
    assert any("starting it from the journal" in r.message for r in caplog.records)
    assert len(await anchorer.flush()) == 3
    assert decode_batch(await ledger.batch_calldata(EDGE.address, 0)).epoch_link == (old_head, 0)
    # garbage: refused, nothing anchored
    ledger.wipe()
    (tmp_path / "sealed" / "epoch").write_bytes(b"\x00" * 64)
    anchorer = Anchorer(journal, ledger, EDGE, max_records=10, epoch_state=_sealed(tmp_path))
    with pytest.raises(SecureCIError, match="sealed"):
        await anchorer.flush()
    assert (await ledger.edge_state(EDGE.address)).next_batch_id == 0
    # plaintext garbage (a sealed mount that reads back as something else): the parser refuses
    plain = SealedEpochStore(PlainSealedStore(tmp_path / "plain"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "epoch").write_bytes(b"SCIE\x01\x01" + bytes(4))
    with pytest.raises(JournalError, match="sealed epoch state"):
        await Anchorer(journal, ledger, EDGE, max_records=10, epoch_state=plain).flush()
    assert (await ledger.edge_state(EDGE.address)).next_batch_id == 0


async def test_a_consistently_rewritten_journal_cannot_steer_the_link(tmp_path: Path) -> None:
    # The host rewrites the lost batches' rows so they still chain (a forged records hash and
    # the heads recomputed from it) and clears their anchored flags: the link still names the
    # head the chain returned for the last batch anchored, which is sealed, and a new epoch
    # starts all the same.
    ledger, journal, old_head = await _anchored_then_chain_lost(tmp_path)
    with sqlite3.connect(tmp_path / "edge.db") as conn:
        prev = bytes(32)
        for b in range(3):
            batch = journal.batch(b)
            forged = keccak256(b"forged records %d" % b)
            head = chain_head(prev, batch.root, forged, batch.first_seq, batch.count)
            conn.execute(
                "UPDATE batches SET prev_head = ?, head = ?, records_hash = ?, anchored = 0"
                " WHERE batch_id = ?",
                (prev, head, forged, b),
            )
            prev = head
    journal.close()
    journal = Journal.open(tmp_path / "edge.db", edge=journal.edge)
    anchorer = Anchorer(journal, ledger, EDGE, max_records=10, epoch_state=_sealed(tmp_path))
    await anchorer.sync()
    assert anchorer.epoch == 1
    assert len(await anchorer.flush()) == 3
    assert decode_batch(await ledger.batch_calldata(EDGE.address, 0)).epoch_link == (old_head, 0)
    state = await ledger.edge_state(EDGE.address)
    assert (state.next_batch_id, state.next_seq) == (3, 30)


def _subdir(path: Path) -> Path:
    path.mkdir()
    return path


async def _crash_run(tmp_path: Path, *, crash: str) -> tuple[bytes, list[Any]]:
    ledger, journal, old_head = await _anchored_then_chain_lost(tmp_path)
    if crash:  # killed before or after sealing the new epoch, before marking the batches
        store = CrashingStore(_sealed(tmp_path), saved=crash == "after sealing")
        with pytest.raises(Killed):
            await Anchorer(journal, ledger, EDGE, max_records=10, epoch_state=store).sync()
        assert journal.unanchored() == []
        journal.close()
        journal = Journal.open(tmp_path / "edge.db", edge=journal.edge)
    anchorer = Anchorer(journal, ledger, EDGE, max_records=10, epoch_state=_sealed(tmp_path))
    assert await anchorer.sync() == 3
    assert anchorer.epoch == 1
    assert len(await anchorer.flush()) == 3
    state = await ledger.edge_state(EDGE.address)
    links = [
        decode_batch(await ledger.batch_calldata(EDGE.address, b)).epoch_link for b in range(3)
    ]
    assert links[0] == (old_head, 0)
    after = AnchoredHead(2, bytes(state.head))
    assert _sealed(tmp_path).load() == EpochState(1, EpochLink(0, old_head, 0), after)
    journal.close()
    return bytes(state.head), links


@pytest.mark.parametrize("crash", ["before sealing", "after sealing"])
async def test_a_crash_around_sealing_the_epoch_reaches_the_same_outcome(
    tmp_path: Path, crash: str
) -> None:
    """kill -9 while a new epoch starts, then a restart: the same epoch, link and heads as
    without the crash (the link names the head the enclave reached, never a later one)."""
    expected = await _crash_run(_subdir(tmp_path / "clean"), crash="")
    assert await _crash_run(_subdir(tmp_path / "crashed"), crash=crash) == expected
