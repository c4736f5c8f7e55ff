"""Equivocation: what the edge's enclave signed elsewhere against what it anchored.

Besides its batches, the chain holds enclave-signed statements from challenges: a
``ChallengeOpened`` event names the record hash of a result the edge's enclave signed for an
edge sequence number (the contract recovered the signature to the edge before it emitted the
event), and a ``RequestRefused`` event says the enclave signed a refusal of the request a
device challenged it with (``RequestChallengeOpened``). A device's receipts hold more such
results (``_audit_receipts``, verified before they reach this module). An anchored record is
checked against all of them when its findings are read (indexed lookups by (edge, seq) and
(edge, request hash)), so challenges and receipts may arrive before or after the batches:

- ``challenge-equivocation``: a challenge holds a result the enclave signed for this record's
  sequence number, or (when the challenge's calldata shows it) for this record's request,
  whose record hash is not this record's;
- ``refusal-equivocation``: the enclave signed a refusal of this record's request;
- ``receipt-equivocation``: a receipt holds a result the enclave signed for this record's
  sequence number, or for its request, whose record hash is not this record's;
- ``receipt-omission`` (no anchored record to attach to: :func:`receipt_omissions`): no
  record of the receipt's edge holds its request or sequence number, no batch covers the
  sequence number, and the chain's time is past the request's deadline plus the grace.

Challenges live in the index (they are chain data); receipts live in a TEMP table of the
connection (they are the auditor's input for one run, never persisted).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from secure_ci.exceptions import ChainError
from secure_ci.ledger._audit_chain import REFUSAL, REQUEST_CHALLENGE, ChallengeEvent
from secure_ci.ledger._audit_receipts import DeviceReceipt
from secure_ci.ledger._findings import FindingCode
from secure_ci.ledger._records import LedgerDomain

__all__ = [
    "CLAIMS_SCHEMA",
    "add_challenge_events",
    "add_receipts",
    "claim_findings",
    "claim_keys",
    "has_claims",
    "receipt_omissions",
    "stored_seq",
]

CLAIMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS challenges (
    challenge_id INTEGER PRIMARY KEY, kind INTEGER NOT NULL, edge BLOB NOT NULL,
    value BLOB NOT NULL, seq INTEGER NOT NULL, task_id BLOB NOT NULL,
    refusal INTEGER NOT NULL DEFAULT 0, request BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS challenges_edge ON challenges (edge, seq, value);
CREATE INDEX IF NOT EXISTS challenges_request ON challenges (edge, value);
CREATE INDEX IF NOT EXISTS challenges_result_request ON challenges (edge, request);
"""
_RECEIPTS_SCHEMA = """
CREATE TEMP TABLE IF NOT EXISTS receipts (
    edge BLOB NOT NULL, seq INTEGER NOT NULL, record_hash BLOB NOT NULL,
    request_hash BLOB NOT NULL, task_id BLOB NOT NULL, device BLOB NOT NULL,
    deadline INTEGER NOT NULL, ordinal INTEGER NOT NULL,
    PRIMARY KEY (edge, seq, record_hash)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS temp.receipts_request ON receipts (edge, request_hash);
"""
_MAX_ID = (1 << 63) - 1
_REASONS = {1: "never received"}


def stored_seq(seq: int) -> int:
    """The index's sequence number for a signed u64 one: -1 past SQLite's integers (an edge may
    sign any u64, but its batches count up from 0, so no record is ever there)."""
    return seq if seq <= _MAX_ID else -1


def add_challenge_events(conn: sqlite3.Connection, events: Iterable[ChallengeEvent]) -> None:
    """Store challenges (by id) and the refusals that answered request challenges."""
    for e in events:
        if e.challenge_id > _MAX_ID:  # ids count up from 1: a node that says otherwise lies
            raise ChainError(f"challenge id {e.challenge_id} is out of the index's range")
        if e.kind == REFUSAL:
            conn.execute(
                "UPDATE challenges SET refusal = ? WHERE challenge_id = ? AND kind = ?"
                " AND edge = ?",
                (e.reason, e.challenge_id, REQUEST_CHALLENGE, e.edge),
            )
        else:
            conn.execute(
                "INSERT OR IGNORE INTO challenges VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                (
                    e.challenge_id,
                    e.kind,
                    e.edge,
                    e.value,
                    stored_seq(e.seq),
                    e.task_id,
                    e.request_hash,
                ),
            )


def add_receipts(
    conn: sqlite3.Connection, domain: LedgerDomain, receipts: Iterable[DeviceReceipt]
) -> int:
    """Load verified receipts for this connection; the number of distinct receipts held."""
    for statement in _RECEIPTS_SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.executemany(
        "INSERT OR IGNORE INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?,"
        " (SELECT COUNT(*) FROM receipts))",
        (
            (
                r.edge, stored_seq(r.result.edge_seq), r.result.digest(domain),
                r.result.request_hash, r.request.task_id, r.request.device,
                min(r.request.deadline, _MAX_ID),
            )
            for r in receipts
        ),
    )  # fmt: skip
    return int(conn.execute("SELECT COUNT(*) FROM receipts").fetchone()[0])


def _receipts_loaded(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM temp.sqlite_master WHERE type = 'table' AND name = 'receipts'"
    ).fetchone()
    return row is not None


def has_claims(conn: sqlite3.Connection) -> bool:
    """True when any challenge or receipt could give a record an equivocation finding."""
    if conn.execute("SELECT EXISTS (SELECT 1 FROM challenges)").fetchone()[0]:
        return True
    return _receipts_loaded(conn) and bool(
        conn.execute("SELECT EXISTS (SELECT 1 FROM receipts)").fetchone()[0]
    )


def claim_keys(conn: sqlite3.Connection) -> set[tuple[bytes, int | bytes]]:
    """Every (edge, seq) and (edge, request hash) some claim names: listing many records,
    only those that match one are looked up (:func:`claim_findings`)."""
    keys: set[tuple[bytes, int | bytes]] = set()
    for edge, kind, value, seq, request in conn.execute(
        "SELECT edge, kind, value, seq, request FROM challenges WHERE kind = 0 OR refusal != 0"
    ):
        keys.add((bytes(edge), int(seq)) if kind == 0 else (bytes(edge), bytes(value)))
        if kind == 0 and request:
            keys.add((bytes(edge), bytes(request)))
    if _receipts_loaded(conn):
        for edge, seq, request_hash in conn.execute("SELECT edge, seq, request_hash FROM receipts"):
            keys.update(((bytes(edge), int(seq)), (bytes(edge), bytes(request_hash))))
    return keys


def claim_findings(
    conn: sqlite3.Connection,
    edge: bytes,
    seq: int,
    request_hash: bytes,
    record_hash: bytes,
) -> list[tuple[FindingCode, str]]:
    """The equivocation findings of the record anchored at (``edge``, ``seq``)."""
    out: list[tuple[FindingCode, str]] = []
    for challenge_id, value, task_id, other_seq in conn.execute(
        "SELECT challenge_id, value, task_id, seq FROM challenges WHERE edge = ? AND kind = 0"
        " AND (seq = ? OR request = ?) AND value != ? ORDER BY challenge_id",
        (edge, seq, request_hash, record_hash),
    ):
        what = f"for seq {seq}" if other_seq == seq else f"for this request at seq {other_seq}"
        out.append((
            FindingCode.CHALLENGE_EQUIVOCATION,
            f"in challenge {challenge_id} the enclave signed another result {what} (record"
            f" hash 0x{bytes(value).hex()}, task 0x{bytes(task_id).hex()}) than the anchored"
            f" one (record hash 0x{record_hash.hex()})",
        ))  # fmt: skip
    for challenge_id, refusal in conn.execute(
        "SELECT challenge_id, refusal FROM challenges WHERE edge = ? AND value = ?"
        " AND kind = ? AND refusal != 0",
        (edge, request_hash, REQUEST_CHALLENGE),
    ):
        reason = _REASONS.get(int(refusal), "the edge's refusal code")
        out.append((
            FindingCode.REFUSAL_EQUIVOCATION,
            f"in request challenge {challenge_id} the enclave signed a refusal (reason"
            f" {refusal}: {reason}) of this anchored request",
        ))  # fmt: skip
    if _receipts_loaded(conn):
        for other_seq, other_hash in conn.execute(
            "SELECT seq, record_hash FROM receipts WHERE edge = ? AND (seq = ? OR"
            " request_hash = ?) AND record_hash != ? ORDER BY seq, record_hash",
            (edge, seq, request_hash, record_hash),
        ):
            what = f"for seq {seq}" if other_seq == seq else f"for this request at seq {other_seq}"
            out.append((
                FindingCode.RECEIPT_EQUIVOCATION,
                f"a device receipt holds another result the enclave signed {what} (record"
                f" hash 0x{bytes(other_hash).hex()}) than the anchored one (record hash"
                f" 0x{record_hash.hex()})",
            ))  # fmt: skip
    return out


def receipt_omissions(
    conn: sqlite3.Connection, now: int, grace: int
) -> list[tuple[bytes, int, bytes, str]]:
    """Receipts whose task was never anchored: (edge, seq, record hash, message) each.

    ``now`` is the chain's time (the latest block's timestamp); a receipt counts once its
    request's deadline plus ``grace`` is before it. A sequence number that a batch covers is
    not an omission: its record is either indexed (equivocation or a match) or in a batch
    that could not be audited (that batch's finding stands against the edge).
    """
    if not _receipts_loaded(conn):
        return []
    rows = conn.execute(
        "SELECT r.edge, r.seq, r.record_hash, r.task_id, r.device, r.deadline FROM receipts r"
        " WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.edge = r.edge AND t.seq = r.seq)"
        " AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.edge = r.edge"
        "   AND b.first_seq <= r.seq AND r.seq < b.first_seq + b.count)"
        " ORDER BY r.edge, r.seq, r.ordinal"
    ).fetchall()
    out = []
    for edge, seq, record_hash, task_id, device, deadline in rows:
        if now <= int(deadline) + grace or _answered(conn, bytes(edge), bytes(task_id), device):
            continue
        out.append((
            bytes(edge), int(seq), bytes(record_hash),
            f"the edge signed this task's result for its seq but anchored no record there"
            f" (chain time {now} is past the deadline {deadline} plus the grace {grace} s)",
        ))  # fmt: skip
    return out


def _answered(conn: sqlite3.Connection, edge: bytes, task_id: bytes, device: object) -> bool:
    """True when the edge anchored a record of the receipt's request at another sequence
    number (that record carries the receipt-equivocation finding)."""
    row = conn.execute(
        "SELECT 1 FROM receipts r JOIN tasks t INDEXED BY tasks_task ON t.task_id = r.task_id"
        " AND t.device = r.device AND t.edge = r.edge"
        " WHERE r.edge = ? AND r.task_id = ? AND r.device = ?"
        " AND substr(t.result, 33, 32) = r.request_hash LIMIT 1",
        (edge, task_id, device),
    ).fetchone()
    return row is not None
