"""The write-ahead journal: durability, batches, anchoring state, corruption, kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from eth_account import Account

from secure_ci.exceptions import JournalError
from secure_ci.ledger._anchor import Anchorer
from secure_ci.ledger._calldata import BatchRecords, encode_batch
from secure_ci.ledger._journal import Journal
from secure_ci.ledger._merkle import MerkleTree, chain_head, leaf_hash
from secure_ci.ledger._records import LedgerDomain, address_of, keccak256
from secure_ci.testing import MemoryLedger, sample_tasks

DOMAIN = LedgerDomain(31337, b"\x5c" * 20)
EDGE_KEY = keccak256(b"edge")
EDGE = address_of(EDGE_KEY)


def test_append_close_batch_and_reopen(tmp_path: Path) -> None:
    entries = sample_tasks(25, edge_key=EDGE_KEY, domain=DOMAIN)
    with Journal.open(tmp_path / "j.db", edge=EDGE) as journal:
        journal.append(entries[0])
        journal.append_many(entries[1:])
        assert (journal.next_seq, journal.pending) == (25, 25)
        b0 = journal.close_batch(10)
        b1 = journal.close_batch(10)
        assert b0 is not None
        assert b1 is not None
        leaves = [leaf_hash(e.result.edge_seq, e.record_hash) for e in entries[:10]]
        assert b0.root == MerkleTree.build(leaves).root
        calldata = encode_batch(BatchRecords(EDGE, 0, tuple(e.anchored() for e in entries[:10])))
        assert b0.records_hash == keccak256(calldata)
        assert b0.head == chain_head(bytes(32), b0.root, b0.records_hash, 0, 10)
        assert (b1.first_seq, b1.prev_head) == (10, b0.head)
        journal.mark_anchored(0, b"\xaa" * 32, 7)
    with Journal.open(tmp_path / "j.db", edge=EDGE) as journal:
        assert (journal.next_seq, journal.pending, journal.batch_count) == (25, 5, 2)
        assert journal.head == b1.head
        assert journal.batch(0).anchored
        assert journal.batch(0).block_number == 7
        assert not journal.batch(1).anchored
        assert journal.entries(0, 25) == entries
        assert journal.batch_of_seq(12) == journal.batch(1)
        assert journal.batch_of_seq(22) is None
        journal.mark_unanchored(0)
        assert not journal.batch(0).anchored
        assert journal.close_batch(100) is not None
        assert journal.close_batch(100) is None


def test_rejects_gaps_foreign_edges_and_other_journals(tmp_path: Path) -> None:
    entries = sample_tasks(3, edge_key=EDGE_KEY, domain=DOMAIN)
    with Journal.open(tmp_path / "j.db", edge=EDGE) as journal:
        with pytest.raises(JournalError):
            journal.append(entries[1])
        journal.append_many(entries)
        with pytest.raises(JournalError):
            journal.append(entries[0])
        with pytest.raises(JournalError):
            journal.entries(0, 4)
    with pytest.raises(JournalError):
        Journal.open(tmp_path / "j.db", edge=b"\x01" * 20)
    # a journal written before request chaining (no format marker) is refused, clearly
    with sqlite3.connect(tmp_path / "j.db") as conn:
        conn.execute("DELETE FROM meta WHERE key = 'format'")
    with pytest.raises(JournalError, match="older record format"):
        Journal.open(tmp_path / "j.db", edge=EDGE)


def test_corruption_is_a_journal_error(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with Journal.open(path, edge=EDGE) as journal:
        journal.append_many(sample_tasks(4, edge_key=EDGE_KEY, domain=DOMAIN))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE records SET request = x'00' WHERE seq = 2")
    conn.commit()
    conn.close()
    with Journal.open(path, edge=EDGE) as journal, pytest.raises(JournalError):
        journal.entries(0, 4)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(JournalError):
        Journal.open(garbage, edge=EDGE)


WRITER = textwrap.dedent(
    """
    import sys
    from secure_ci.ledger._journal import Journal
    from secure_ci.ledger._records import LedgerDomain, address_of, keccak256
    from secure_ci.testing import sample_tasks

    key = keccak256(b"edge")
    domain = LedgerDomain(31337, b"\\x5c" * 20)
    entries = sample_tasks(400, edge_key=key, domain=domain)
    journal = Journal.open(sys.argv[1], edge=address_of(key))
    for i in range(0, 400, 4):
        journal.append_many(entries[i : i + 4])
        if i % 40 == 0:
            journal.close_batch(16)
        print(journal.next_seq - 1, flush=True)  # the acknowledgement
    import time
    time.sleep(60)
    """
)


def _write_and_kill(path: Path) -> int:
    """Run an edge that journals and acknowledges records; SIGKILL it mid-batch."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.stdout is not None
    acked = -1
    for _ in range(60):  # kill in the middle, after some acknowledgements
        line = proc.stdout.readline()
        if not line:
            break
        acked = int(line)
        if acked >= 150:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    return acked


@pytest.mark.slow
async def test_kill_9_loses_no_acknowledged_record(tmp_path: Path) -> None:
    path = tmp_path / "edge.db"
    acked = _write_and_kill(path)
    assert acked >= 150
    ledger = MemoryLedger()
    ledger.register_edge(Account.from_key(EDGE_KEY), b"\x11" * 32)
    with Journal.open(path, edge=EDGE) as journal:
        assert journal.next_seq > acked
        assert len(journal.entries(0, journal.next_seq)) == journal.next_seq
        await Anchorer(journal, ledger, Account.from_key(EDGE_KEY), max_records=64).flush()
        state = await ledger.edge_state(EDGE)
        assert state.next_seq == journal.next_seq > acked
        assert state.head == journal.head


def test_the_cache_stays_bounded_while_nothing_anchors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from secure_ci.ledger import _journal

    monkeypatch.setattr(_journal, "MAX_CACHED", 8)
    entries = sample_tasks(40, edge_key=EDGE_KEY, domain=DOMAIN)
    with Journal.open(tmp_path / "j.db", edge=EDGE) as journal:
        for i in range(0, 40, 5):
            journal.append_many(entries[i : i + 5])
            assert len(journal._recent) <= 8
        assert journal.unanchored_records == 40
        assert journal.entries(0, 40) == entries  # the rest comes back from disk
        batch = journal.close_batch(40)
        assert batch is not None
        leaves = [leaf_hash(e.result.edge_seq, e.record_hash) for e in entries]
        assert batch.root == MerkleTree.build(leaves).root
        assert journal.unanchored_records == 40
        journal.mark_anchored(0, None, None)
        assert journal.unanchored_records == 0
