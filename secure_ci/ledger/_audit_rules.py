"""The audit rules that need more than one record, applied when a batch is indexed.

Each rule runs once per indexed batch, inside the transaction that inserts its records, as
indexed lookups (never a scan of the index): a single-task audit then reads its findings
with one primary-key lookup per table. Late anchoring depends on a grace the auditor picks
and is computed when a task is read (:func:`late_anchoring`).

- Replays: each new record probes ``(task_id, device, edge)`` for the earliest other record
  of the group; every record of a replayed task gets one finding, whichever batch came
  first, and a task anchored n times costs n findings.
- Request-chain gaps: only a record that starts a chain in its batch can have a gap (a
  record that continues one names an earlier record of the batch); it probes the request
  hash it names. A gap is resolved when a later-indexed batch (another edge's, or one synced
  later) brings the named request.
- Registry: the index keeps every DeviceRegistered/DeviceRevoked/EdgeRegistered event; the
  state at a batch's block is the key's last event up to and including that block. Findings
  are kept per (batch, device) and per (batch, quote id), not per record.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from secure_ci.ledger._audit_chain import DEVICE, EDGE, RegistryEvent
from secure_ci.ledger._calldata import BatchRecords
from secure_ci.ledger._findings import FindingCode
from secure_ci.ledger._records import REQUEST_ROW, TaskRequest, TaskResult

__all__ = [
    "RULES_SCHEMA",
    "Stored",
    "add_registry_events",
    "all_stored_findings",
    "apply_batch_rules",
    "request_key",
    "stored_findings",
    "stored_from",
]

RULES_SCHEMA = """
CREATE TABLE IF NOT EXISTS findings (
    edge BLOB NOT NULL, seq INTEGER NOT NULL, code TEXT NOT NULL, message TEXT NOT NULL,
    PRIMARY KEY (edge, seq, code, message)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subject_findings (
    edge BLOB NOT NULL, batch_id INTEGER NOT NULL, subject BLOB NOT NULL, code TEXT NOT NULL,
    message TEXT NOT NULL, PRIMARY KEY (edge, batch_id, subject, code)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gaps (
    device BLOB NOT NULL, prev BLOB NOT NULL, edge BLOB NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (device, prev, edge, seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS gaps_task ON gaps (edge, seq);
CREATE TABLE IF NOT EXISTS batch_findings (
    edge BLOB NOT NULL, batch_id INTEGER NOT NULL, code TEXT NOT NULL, message TEXT NOT NULL,
    PRIMARY KEY (edge, batch_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS registry (
    kind INTEGER NOT NULL, key BLOB NOT NULL, block INTEGER NOT NULL, log_index INTEGER NOT NULL,
    value BLOB NOT NULL, PRIMARY KEY (kind, key, block, log_index)) WITHOUT ROWID;
"""
_ZERO = bytes(32)
_OUTPUT = "substr({0}.result, 65, 32)"  # RESULT_ROW: taskId 32 | requestHash 32 | output 32
# For each new record, the earliest *other* record of its (task id, device, edge): one index
# seek (tasks_task orders a group by seq), however many times a task was replayed.
_REPLAYS = f"""
SELECT n.edge, n.seq, o.seq, n.request = o.request,
       {_OUTPUT.format("n")} != {_OUTPUT.format("o")}
FROM tasks n JOIN tasks o ON o.rowid = (
    SELECT f.rowid FROM tasks f INDEXED BY tasks_task
    WHERE f.task_id = n.task_id AND f.device = n.device AND f.edge = n.edge AND f.seq != n.seq
    ORDER BY f.seq LIMIT 1)
WHERE n.rowid > ?
"""  # noqa: S608 (constant text only)


def add_registry_events(conn: sqlite3.Connection, events: Iterable[RegistryEvent]) -> None:
    conn.executemany(
        "INSERT OR IGNORE INTO registry VALUES (?, ?, ?, ?, ?)",
        ((e.kind, e.key, e.block, e.log_index, e.value) for e in events),
    )


def _state_at(conn: sqlite3.Connection, kind: int, key: bytes, block: int) -> tuple[int, bytes]:
    """(block, value) of the key's last registry event up to ``block``; (-1, b"") if none."""
    row = conn.execute(
        "SELECT block, value FROM registry WHERE kind = ? AND key = ? AND block <= ?"
        " ORDER BY block DESC, log_index DESC LIMIT 1",
        (kind, key, block),
    ).fetchone()
    return (-1, b"") if row is None else (int(row[0]), bytes(row[1]))


def _replays(conn: sqlite3.Connection, after_rowid: int) -> None:
    """Each new record of a replayed task names the earliest other anchoring of it; that one,
    if it has no replay finding yet, names the new record. One finding per record, so a task
    anchored n times costs n findings, not n squared."""
    code = str(FindingCode.REPLAYED_REQUEST)
    for edge, seq, other, same_request, other_output in conn.execute(
        _REPLAYS, (after_rowid,)
    ).fetchall():
        what = "the same signed request" if same_request else "another request of this task"
        output = ", with another output" if other_output else ""
        for at, peer in ((seq, other), (other, seq)):
            message = f"{what} is also anchored at seq {peer} of this edge{output}"
            conn.execute(
                "INSERT OR IGNORE INTO findings SELECT ?, ?, ?, ? WHERE NOT EXISTS"
                " (SELECT 1 FROM findings WHERE edge = ? AND seq = ? AND code = ?)",
                (edge, at, code, message, edge, at, code),
            )


def request_key(request_hash: bytes) -> int:
    """The indexed key of a request hash: its first 8 bytes (a compact index; the few
    records that share a key are told apart by their full request)."""
    return int.from_bytes(request_hash[:8], "big", signed=True)


def _seen(conn: sqlite3.Connection, device: bytes, request_hash: bytes) -> bool:
    """True when the index holds the device's request with this struct hash."""
    rows = conn.execute(
        "SELECT request FROM tasks INDEXED BY tasks_request WHERE request_key = ? AND device = ?",
        (request_key(request_hash), device),
    )
    return any(
        TaskRequest(*REQUEST_ROW.unpack(row[0])).struct_hash() == request_hash for row in rows
    )


def _gaps(conn: sqlite3.Connection, edge: bytes, batch: BatchRecords, links: list[int]) -> None:
    open_gaps = []
    for record, link in zip(batch.records, links, strict=True):
        prev, device = record.request.prev_request, record.request.device
        if link < 0 and prev != _ZERO and not _seen(conn, device, prev):
            open_gaps.append((device, prev, edge, record.result.edge_seq))
    if conn.execute("SELECT EXISTS (SELECT 1 FROM gaps)").fetchone()[0]:
        conn.executemany(
            "DELETE FROM gaps WHERE device = ? AND prev = ?",
            ((r.request.device, r.result.request_hash) for r in batch.records),
        )
    conn.executemany("INSERT OR IGNORE INTO gaps VALUES (?, ?, ?, ?)", open_gaps)


def _registry(
    conn: sqlite3.Connection, edge: bytes, batch_id: int, batch: BatchRecords, block: int
) -> None:
    """One finding per (batch, device) and per (batch, quote id): a task's are two lookups."""
    findings: list[tuple[bytes, int, bytes, str, str]] = []
    quote_block, registered_quote = _state_at(conn, EDGE, edge, block)
    for device in {r.request.device for r in batch.records}:
        at, value = _state_at(conn, DEVICE, device, block)
        if not value:
            message = (
                f"device 0x{device.hex()} was never registered by block {block}" if at < 0 else
                f"device 0x{device.hex()} was revoked at block {at}, before the batch's block"
                f" {block}"
            )  # fmt: skip
            findings.append((edge, batch_id, device, FindingCode.DEVICE_NOT_REGISTERED, message))
    for quote in {r.result.quote_id for r in batch.records} - {registered_quote}:
        message = (
            f"the edge had no registration by block {block}" if quote_block < 0 else
            f"quote id 0x{quote.hex()} is not the edge's registered 0x"
            f"{registered_quote.hex()} (registered at block {quote_block})"
        )  # fmt: skip
        findings.append((edge, batch_id, quote, FindingCode.QUOTE_ID_MISMATCH, message))
    conn.executemany(
        "INSERT OR IGNORE INTO subject_findings VALUES (?, ?, ?, ?, ?)",
        ((e, b, subject, str(code), m) for e, b, subject, code, m in findings),
    )


def apply_batch_rules(
    conn: sqlite3.Connection,
    edge: bytes,
    batch_id: int,
    batch: BatchRecords,
    links: list[int],
    after_rowid: int,
    registry_block: int | None,
) -> None:
    """Record the findings the batch just inserted (rows after ``after_rowid``) brings.

    ``registry_block`` is the block whose registry state applies (the anchoring block), or
    None when the index has no registry history for it.
    """
    _replays(conn, after_rowid)
    _gaps(conn, edge, batch, links)
    if registry_block is not None:
        _registry(conn, edge, batch_id, batch, registry_block)


def stored_findings(
    conn: sqlite3.Connection, edge: bytes, batch_id: int, request: TaskRequest, result: TaskResult
) -> list[tuple[FindingCode, str]]:
    """The stored findings of one record: a few primary-key lookups."""
    seq = result.edge_seq
    rows = conn.execute(
        "SELECT code, message FROM findings WHERE edge = ? AND seq = ?", (edge, seq)
    ).fetchall()
    rows += conn.execute(
        "SELECT code, message FROM subject_findings WHERE edge = ? AND batch_id = ?"
        " AND subject IN (?, ?)",
        (edge, batch_id, request.device, result.quote_id),
    ).fetchall()
    out = [(FindingCode(code), str(message)) for code, message in rows]
    for device, prev in conn.execute(
        "SELECT device, prev FROM gaps WHERE edge = ? AND seq = ?", (edge, seq)
    ):
        out.append(_gap(bytes(device), bytes(prev)))
    return out


Stored = tuple[
    dict[tuple[bytes, int], list[tuple[FindingCode, str]]],
    dict[tuple[bytes, int, bytes], list[tuple[FindingCode, str]]],
]


def all_stored_findings(conn: sqlite3.Connection) -> Stored:
    """Every stored finding, by (edge, seq) and by (edge, batch id, subject): for listing
    many tasks at once (:func:`stored_from`)."""
    by_seq: dict[tuple[bytes, int], list[tuple[FindingCode, str]]] = {}
    for edge, seq, code, message in conn.execute("SELECT edge, seq, code, message FROM findings"):
        by_seq.setdefault((bytes(edge), int(seq)), []).append((FindingCode(code), str(message)))
    for device, prev, edge, seq in conn.execute("SELECT device, prev, edge, seq FROM gaps"):
        by_seq.setdefault((bytes(edge), int(seq)), []).append(_gap(bytes(device), bytes(prev)))
    by_subject: dict[tuple[bytes, int, bytes], list[tuple[FindingCode, str]]] = {}
    for edge, batch_id, subject, code, message in conn.execute(
        "SELECT edge, batch_id, subject, code, message FROM subject_findings"
    ):
        key = (bytes(edge), int(batch_id), bytes(subject))
        by_subject.setdefault(key, []).append((FindingCode(code), str(message)))
    return by_seq, by_subject


def stored_from(
    stored: Stored, edge: bytes, batch_id: int, request: TaskRequest, result: TaskResult
) -> list[tuple[FindingCode, str]]:
    """:func:`stored_findings` from what :func:`all_stored_findings` read."""
    by_seq, by_subject = stored
    out = list(by_seq.get((edge, result.edge_seq), ()))
    for subject in (request.device, result.quote_id):
        out += by_subject.get((edge, batch_id, subject), ())
    return out


def _gap(device: bytes, prev: bytes) -> tuple[FindingCode, str]:
    return (
        FindingCode.REQUEST_CHAIN_GAP,
        f"prevRequest 0x{prev.hex()} names a request of device 0x{device.hex()} that no"
        " indexed batch holds",
    )
