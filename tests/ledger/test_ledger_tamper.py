"""A Byzantine host rewrites the edge's journal between runs: the enclave refuses to anchor
anything it did not sign, and says so; nothing forged reaches the chain.

The host controls the journal file (it lives outside the enclave). Each test journals and
closes records in one run, changes the file as an attacker would, then restarts the anchorer
on it, the way a restarted edge does.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from eth_account import Account

from secure_ci.exceptions import JournalError
from secure_ci.ledger._anchor import Anchorer
from secure_ci.ledger._journal import Journal
from secure_ci.ledger._records import RESULT_ROW, TaskResult, keccak256
from secure_ci.testing import MemoryLedger, sample_tasks

EDGE_KEY = keccak256(b"edge")
EDGE = Account.from_key(EDGE_KEY)
EDGE_ADDRESS = bytes.fromhex(EDGE.address[2:])


def _journal(tmp_path: Path, ledger: MemoryLedger, count: int = 12) -> Path:
    path = tmp_path / "edge.db"
    with Journal.open(path, edge=EDGE_ADDRESS) as journal:
        journal.append_many(sample_tasks(count, edge_key=EDGE_KEY, domain=ledger.domain))
        journal.close_batch(count)
    return path


def _ledger() -> MemoryLedger:
    ledger = MemoryLedger()
    ledger.register_edge(EDGE, b"\x11" * 32)
    return ledger


def _edit(path: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, args)
    conn.close()


def _forge(result: bytes, **change: object) -> TaskResult:
    fields = dict(zip(TaskResult.__slots__, RESULT_ROW.unpack(result), strict=True))
    fields.update(change)
    return TaskResult(**fields)  # type: ignore[arg-type]


def _forged_output(path: Path, ledger: MemoryLedger, rehash: bool) -> None:
    conn = sqlite3.connect(path)
    (row,) = conn.execute("SELECT result FROM records WHERE seq = 5").fetchall()
    conn.close()
    forged = _forge(row[0], output_commitment=b"\xee" * 32, latency_ms=1)
    packed = RESULT_ROW.pack(*(getattr(forged, f) for f in TaskResult.__slots__))
    _edit(path, "UPDATE records SET result = ? WHERE seq = 5", packed)
    if rehash:  # the host can compute the EIP-712 digest too; it cannot sign it
        _edit(
            path, "UPDATE records SET record_hash = ? WHERE seq = 5", forged.digest(ledger.domain)
        )


Tamper = Callable[[Path, MemoryLedger], None]
ATTACKS: dict[str, tuple[Tamper, str]] = {
    "forged output, old hash": (lambda p, ledger: _forged_output(p, ledger, False), "record hash"),
    "forged output, rehashed": (lambda p, ledger: _forged_output(p, ledger, True), "not signed"),
    "batch root rewritten": (
        lambda p, ledger: _edit(p, "UPDATE batches SET root = ? WHERE batch_id = 0", b"\x01" * 32),
        "changed on disk",
    ),
    "record deleted": (
        lambda p, ledger: _edit(p, "DELETE FROM records WHERE seq = 3"),
        "lacks|do not match",
    ),
    "records swapped": (
        lambda p, ledger: _edit(
            p,
            "UPDATE records SET result = (SELECT result FROM records WHERE seq = 2) WHERE seq = 7",
        ),
        "not match|does not answer",
    ),
    "device signature replaced": (
        lambda p, ledger: _edit(p, "UPDATE records SET device_sig = edge_sig WHERE seq = 4"),
        "not signed by its device|does not verify",
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
async def test_a_rewritten_journal_is_never_anchored(tmp_path: Path, attack: str) -> None:
    ledger = _ledger()
    path = _journal(tmp_path, ledger)
    tamper, reason = ATTACKS[attack]
    tamper(path, ledger)
    with Journal.open(path, edge=EDGE_ADDRESS) as journal:
        anchorer = Anchorer(journal, ledger, EDGE, max_records=100)
        with pytest.raises(JournalError, match=reason):
            await anchorer.flush()
    assert (await ledger.edge_state(EDGE.address)).next_seq == 0  # nothing reached the chain


async def test_an_untouched_journal_read_back_from_disk_anchors(tmp_path: Path) -> None:
    ledger = _ledger()
    path = _journal(tmp_path, ledger)
    with Journal.open(path, edge=EDGE_ADDRESS) as journal:
        await Anchorer(journal, ledger, EDGE, max_records=100).flush()
    assert (await ledger.edge_state(EDGE.address)).next_seq == 12


async def test_a_journal_rolled_back_behind_the_chain_is_refused(tmp_path: Path) -> None:
    ledger = _ledger()
    path = _journal(tmp_path, ledger, count=4)
    shutil.copy(path, tmp_path / "old.db")
    with Journal.open(path, edge=EDGE_ADDRESS) as journal:
        anchorer = Anchorer(journal, ledger, EDGE, max_records=100)
        await anchorer.flush()
        journal.append_many(sample_tasks(4, edge_key=EDGE_KEY, domain=ledger.domain, first_seq=4))
        await anchorer.flush()
    shutil.copy(tmp_path / "old.db", path)  # the host restores an older copy
    with (
        Journal.open(path, edge=EDGE_ADDRESS) as journal,
        pytest.raises(JournalError, match="chain has 2 batches"),
    ):
        await Anchorer(journal, ledger, EDGE, max_records=100).flush()


@pytest.mark.parametrize(
    ("column", "value"),
    [("root", b"\x01" * 32), ("records_hash", b"\x02" * 32), ("count", 11), ("first_seq", 1)],
)
async def test_a_batch_rewritten_while_the_edge_runs_is_never_anchored(
    tmp_path: Path, column: str, value: object
) -> None:
    """The edge keeps what it computed when it closed a batch and anchors from that memory
    only while the file still says the same; a row the host rewrote meanwhile is checked
    against the records like any read back from disk."""
    ledger = _ledger()
    with Journal.open(tmp_path / "edge.db", edge=EDGE_ADDRESS) as journal:
        journal.append_many(sample_tasks(12, edge_key=EDGE_KEY, domain=ledger.domain))
        journal.close_batch(12)
        sql = f"UPDATE batches SET {column} = ? WHERE batch_id = 0"
        _edit(tmp_path / "edge.db", sql, value)
        anchorer = Anchorer(journal, ledger, EDGE, max_records=100)
        with pytest.raises(JournalError):
            await anchorer.flush()
    assert (await ledger.edge_state(EDGE.address)).next_seq == 0


async def test_a_batch_closed_here_anchors_from_memory(tmp_path: Path) -> None:
    ledger = _ledger()
    with Journal.open(tmp_path / "edge.db", edge=EDGE_ADDRESS) as journal:
        journal.append_many(sample_tasks(12, edge_key=EDGE_KEY, domain=ledger.domain))
        batch = journal.close_batch(12)
        assert batch is not None
        assert journal.closed_here(batch) is not None
        await Anchorer(journal, ledger, EDGE, max_records=100).flush()
        assert journal.closed_here(batch) is None  # anchored: forgotten
    assert (await ledger.edge_state(EDGE.address)).next_seq == 12
