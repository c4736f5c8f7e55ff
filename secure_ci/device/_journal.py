"""The device journal: every task a device got a verified result for, and what became of it.

SQLite (WAL, ``synchronous=FULL``): :meth:`DeviceJournal.record` returns once the signed
request, the enclave-signed result and both salts are on disk, so a device that printed a
result can always prove it later (the receipt), or challenge the edge that did not anchor it.
States: ``answered`` (verified result, not yet seen on chain), ``anchored`` (an inclusion
receipt is stored), ``challenged`` (overdue or anchored wrongly; the challenge id is stored),
``superseded`` (a verified result that came after the task had been accepted from another
edge or finished locally: kept as evidence, never used).

Requests sent without a verified result (the edge refused, failed, went silent, or sent a
result that did not verify) are kept too, as ``unanswered`` requests: once overdue the
device challenges the edge with the signed request alone (a request-only challenge).

A fleet device (:mod:`secure_ci.device._fleet`) also writes ahead: :meth:`begin` stores a
task's inputs before any work, :meth:`finish` removes them and records the outcome (mode,
edge, every attempt) with the accepted receipt in one transaction, so a device killed at any
point finds its unfinished tasks in :meth:`unfinished` and no finished one twice.
"""

from __future__ import annotations

import sqlite3
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_ci.device._tasks import TaskReceipt
from secure_ci.exceptions import JournalError, RecordError
from secure_ci.ledger._canonical import OutputOpening
from secure_ci.ledger._records import REQUEST_ROW, RESULT_ROW, LedgerDomain, TaskRequest, TaskResult

__all__ = ["DeviceJournal", "JournalTask", "UnansweredRequest"]

_FORMAT = b"device/1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    device BLOB NOT NULL, task_id BLOB NOT NULL, edge BLOB NOT NULL, edge_seq INTEGER NOT NULL,
    request BLOB NOT NULL, result BLOB NOT NULL, device_sig BLOB NOT NULL,
    edge_sig BLOB NOT NULL, input_salt BLOB NOT NULL, output_salt BLOB NOT NULL,
    chain_id INTEGER NOT NULL, contract BLOB NOT NULL, deadline INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'answered', receipt BLOB, challenge_id INTEGER, opening BLOB,
    PRIMARY KEY (device, task_id, edge));
CREATE TABLE IF NOT EXISTS pending (
    task_key INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, inputs BLOB NOT NULL,
    salt BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outcomes (
    task_key INTEGER PRIMARY KEY, finished REAL NOT NULL, mode TEXT NOT NULL, edge TEXT,
    task_id BLOB, attempts TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    device BLOB NOT NULL, task_id BLOB NOT NULL, edge BLOB NOT NULL, request BLOB NOT NULL,
    device_sig BLOB NOT NULL, chain_id INTEGER NOT NULL, contract BLOB NOT NULL,
    deadline INTEGER NOT NULL, challenge_id INTEGER, PRIMARY KEY (device, task_id, edge));
"""
_COLUMNS = (
    "request, result, device_sig, edge_sig, input_salt, output_salt, chain_id, contract,"
    " state, receipt, challenge_id, opening"
)


@dataclass(frozen=True)
class JournalTask:
    """One journalled task: its receipt material and its state on the ledger."""

    receipt: TaskReceipt
    state: str
    anchored_receipt: bytes | None
    challenge_id: int | None

    @property
    def task_id(self) -> bytes:
        return self.receipt.request.task_id


@dataclass(frozen=True)
class UnansweredRequest:
    """A signed request the edge never answered with a verified result."""

    request: TaskRequest
    device_sig: bytes
    domain: LedgerDomain
    challenge_id: int | None


class DeviceJournal:
    """A device's task journal in one SQLite file (use :meth:`open` as a context manager)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path | str) -> DeviceJournal:
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            if "opening" not in {c[1] for c in conn.execute("PRAGMA table_info(tasks)")}:
                # a journal from before output openings: its receipts have none
                conn.execute("ALTER TABLE tasks ADD COLUMN opening BLOB")
            row = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('format', ?)", (_FORMAT,))
            elif bytes(row[0]) != _FORMAT:
                conn.close()
                raise JournalError(f"{path} is not a device journal of this version")
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open device journal {path}: {exc}") from exc
        return cls(conn)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> DeviceJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _execute(self, sql: str, *args: object) -> list[Any]:
        try:
            with self._lock:
                return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"device journal failed: {exc}") from exc

    def record(self, receipt: TaskReceipt) -> None:
        """Durably keep a verified task (returns after fsync); recording twice is a no-op."""
        self._execute(_INSERT, *_row(receipt, "answered"))

    def begin(self, inputs: bytes, salt: bytes, now: float) -> int:
        """Write a task's inputs and input salt ahead of its work (returns after fsync); its
        key. The salt makes a resumed task the same task (the same task id) at every edge."""
        try:
            with self._lock:
                cursor = self._conn.execute(
                    "INSERT INTO pending (created, inputs, salt) VALUES (?, ?, ?)",
                    (now, inputs, salt),
                )
        except sqlite3.Error as exc:
            raise JournalError(f"device journal failed: {exc}") from exc
        return int(cursor.lastrowid or 0)

    def finish(
        self,
        key: int,
        *,
        mode: str,
        edge: str | None,
        attempts: str,
        receipt: TaskReceipt | None,
        now: float,
    ) -> None:
        """A task is done: its outcome (and accepted receipt) in, its inputs out, atomically."""
        try:
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    if receipt is not None:
                        self._conn.execute(_INSERT, _row(receipt, "answered"))
                    self._conn.execute(
                        "INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?, ?, ?, ?)",
                        (key, now, mode, edge, receipt and receipt.request.task_id, attempts),
                    )
                    self._conn.execute("DELETE FROM pending WHERE task_key = ?", (key,))
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise JournalError(f"device journal failed: {exc}") from exc

    def record_superseded(self, receipt: TaskReceipt) -> None:
        """A verified result that arrived after its task was accepted elsewhere."""
        self._execute(_INSERT, *_row(receipt, "superseded"))

    def unfinished(self) -> list[tuple[int, bytes, bytes]]:
        """Tasks begun and never finished (the device stopped): (key, inputs, salt), oldest
        first."""
        rows = self._execute("SELECT task_key, inputs, salt FROM pending ORDER BY task_key")
        return [(int(k), bytes(v), bytes(s)) for k, v, s in rows]

    def outcome(self, key: int) -> tuple[str, str | None, str] | None:
        """A finished task's (mode, edge, attempts as JSON), or None."""
        rows = self._execute("SELECT mode, edge, attempts FROM outcomes WHERE task_key = ?", key)
        return None if not rows else (str(rows[0][0]), rows[0][1], str(rows[0][2]))

    def record_unanswered(
        self, request: TaskRequest, device_sig: bytes, domain: LedgerDomain
    ) -> None:
        """Keep a signed request that got no verified result (a no-op once kept)."""
        self._execute(
            "INSERT OR IGNORE INTO requests (device, task_id, edge, request, device_sig,"
            " chain_id, contract, deadline) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            request.device, request.task_id, request.edge,
            REQUEST_ROW.pack(*(getattr(request, f) for f in TaskRequest.__slots__)),
            device_sig, domain.chain_id, domain.contract, request.deadline,
        )  # fmt: skip

    def unanswered(self) -> Iterator[UnansweredRequest]:
        """Unanswered requests, oldest first, except those answered later (a task of the
        same device, id and edge with a verified result)."""
        rows = self._execute(
            "SELECT r.request, r.device_sig, r.chain_id, r.contract, r.challenge_id FROM requests r"
            " WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.device = r.device AND"
            " t.task_id = r.task_id AND t.edge = r.edge) ORDER BY r.rowid"
        )
        for req, sig, chain_id, contract, challenge in rows:
            try:
                request = TaskRequest(*REQUEST_ROW.unpack(bytes(req)))
            except (struct.error, TypeError, ValueError) as exc:
                raise JournalError(f"device journal row is corrupt: {exc}") from exc
            domain = LedgerDomain(int(chain_id), bytes(contract))
            yield UnansweredRequest(
                request, bytes(sig), domain, None if challenge is None else int(challenge)
            )

    def mark_request_challenged(self, request: TaskRequest, challenge_id: int) -> None:
        self._execute(
            "UPDATE requests SET challenge_id = ? WHERE device = ? AND task_id = ? AND edge = ?",
            challenge_id, request.device, request.task_id, request.edge,
        )  # fmt: skip

    def mark_anchored(self, task: JournalTask, receipt: bytes) -> None:
        self._set(task, "anchored", receipt=receipt)

    def mark_unanchored(self, task: JournalTask) -> None:
        """The chain no longer shows the task (it lost its state): answered again."""
        self._set(task, "answered")

    def mark_challenged(self, task: JournalTask, challenge_id: int) -> None:
        self._set(task, "challenged", challenge_id=challenge_id)

    def _set(self, task: JournalTask, state: str, **values: object) -> None:
        q = task.receipt.request
        self._execute(
            "UPDATE tasks SET state = ?, receipt = COALESCE(?, receipt),"
            " challenge_id = COALESCE(?, challenge_id) WHERE device = ? AND task_id = ?"
            " AND edge = ?",
            state, values.get("receipt"), values.get("challenge_id"), q.device, q.task_id, q.edge,
        )  # fmt: skip

    def tasks(self, *, state: str | None = None) -> Iterator[JournalTask]:
        """Journalled tasks, oldest first (``state`` filters)."""
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        rows = self._execute(f"SELECT {_COLUMNS} FROM tasks {where} ORDER BY rowid", *args)  # noqa: S608
        for row in rows:
            yield _task(row)

    def __len__(self) -> int:
        return int(self._execute("SELECT COUNT(*) FROM tasks")[0][0])


_INSERT = (
    "INSERT OR IGNORE INTO tasks (device, task_id, edge, edge_seq, request, result, device_sig,"
    " edge_sig, input_salt, output_salt, chain_id, contract, deadline, state, opening)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _row(receipt: TaskReceipt, state: str) -> tuple[object, ...]:
    q, r = receipt.request, receipt.result
    return (
        q.device, q.task_id, q.edge, r.edge_seq,
        REQUEST_ROW.pack(*(getattr(q, f) for f in TaskRequest.__slots__)),
        RESULT_ROW.pack(*(getattr(r, f) for f in TaskResult.__slots__)),
        receipt.device_sig, receipt.edge_sig, receipt.input_salt, receipt.output_salt,
        receipt.domain.chain_id, receipt.domain.contract, q.deadline, state,
        None if receipt.opening is None else receipt.opening.canonical + receipt.opening.payload,
    )  # fmt: skip


def _task(row: Any) -> JournalTask:
    req, res, dsig, esig, isalt, osalt, chain_id, contract, state, receipt, challenge, op = row
    try:
        request = TaskRequest(*REQUEST_ROW.unpack(bytes(req)))
        result = TaskResult(*RESULT_ROW.unpack(bytes(res)))
        opening = (
            None if op is None else OutputOpening(bytes(osalt), bytes(op[:32]), bytes(op[32:]))
        )
    except (struct.error, TypeError, ValueError, RecordError) as exc:
        raise JournalError(f"device journal row is corrupt: {exc}") from exc
    domain = LedgerDomain(int(chain_id), bytes(contract))
    return JournalTask(
        TaskReceipt(
            request, result, bytes(dsig), bytes(esig), bytes(isalt), bytes(osalt), domain, opening
        ),
        str(state),
        None if receipt is None else bytes(receipt),
        None if challenge is None else int(challenge),
    )
