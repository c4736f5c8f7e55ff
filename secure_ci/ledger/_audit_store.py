"""The audit index's SQLite file: schema, format marker, opening, transactions, proof blobs.

One file per (chain id, contract). ``meta`` holds the domain, the format marker (an index of
another format is refused with what to do) and how far the registry history was read.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from secure_ci.exceptions import LedgerError
from secure_ci.ledger._audit_claims import CLAIMS_SCHEMA
from secure_ci.ledger._audit_rules import RULES_SCHEMA
from secure_ci.ledger._merkle import MerkleTree
from secure_ci.ledger._records import LedgerDomain

__all__ = [
    "FORMAT",
    "INSERT_BATCH",
    "INSERT_TASK",
    "SELECT_TASKS",
    "SELECT_TASK_ID",
    "Transaction",
    "address_bytes",
    "nodes_blob",
    "open_index",
    "proof_from_blob",
]

CACHE_KIB = 64 * 1024  # random-key index inserts (task ids, request hashes) stay in memory
FORMAT = b"4"  # 3: findings (request hashes, anchoring times, registry, bad batches); 4: challenges
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    edge BLOB NOT NULL, batch_id INTEGER NOT NULL, first_seq INTEGER NOT NULL,
    count INTEGER NOT NULL, root BLOB NOT NULL, block_number INTEGER NOT NULL,
    nodes BLOB NOT NULL, measurement BLOB NOT NULL, anchored_at INTEGER NOT NULL,
    PRIMARY KEY (edge, batch_id));
CREATE TABLE IF NOT EXISTS tasks (
    task_id BLOB NOT NULL, edge BLOB NOT NULL, batch_id INTEGER NOT NULL, seq INTEGER NOT NULL,
    device BLOB NOT NULL, model_id BLOB NOT NULL, deadline INTEGER NOT NULL,
    request BLOB NOT NULL, result BLOB NOT NULL, device_sig BLOB NOT NULL,
    next_seq INTEGER NOT NULL, request_key INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_task ON tasks (task_id, device, edge, seq);
CREATE INDEX IF NOT EXISTS tasks_device ON tasks (device);
CREATE INDEX IF NOT EXISTS tasks_edge ON tasks (edge, seq);
CREATE INDEX IF NOT EXISTS tasks_request ON tasks (request_key);
"""
# Only constant column names and "?" placeholders are ever spliced into SQL.
_COLUMNS = (
    "task_id, edge, batch_id, seq, device, model_id, deadline, request, result, device_sig,"
    " next_seq, request_key"
)
INSERT_TASK = f"INSERT INTO tasks ({_COLUMNS}) VALUES ({', '.join('?' * 12)})"  # noqa: S608
INSERT_BATCH = f"INSERT INTO batches VALUES ({', '.join('?' * 9)})"  # noqa: S608
SELECT_TASKS = (
    "SELECT t.edge, t.batch_id, t.request, t.result, t.device_sig, t.next_seq, b.anchored_at"
    " FROM tasks t JOIN batches b ON b.edge = t.edge AND b.batch_id = t.batch_id"
)
SELECT_TASK_ID = SELECT_TASKS.replace("tasks t", "tasks t INDEXED BY tasks_task")
"""Records by task id: the planner never scans a device's or an edge's records for one."""


def open_index(
    path: Path | str, domain: LedgerDomain | None
) -> tuple[sqlite3.Connection, LedgerDomain]:
    """Open (or create, for ``domain``) the index at ``path``; its connection and domain."""
    try:
        conn = sqlite3.connect(str(path), isolation_level=None)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open audit index {path}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA cache_size = {-CACHE_KIB}")
        conn.execute(_META)
        row = conn.execute("SELECT value FROM meta WHERE key = 'domain'").fetchone()
        version = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if row is not None and (version is None or bytes(version[0]) != FORMAT):
            raise LedgerError(f"audit index {path} has an older format: delete it to rebuild it")
        if row is not None:
            raw = bytes(row[0])
            stored = LedgerDomain(int.from_bytes(raw[20:], "big"), raw[:20])
            if domain is not None and stored != domain:
                raise LedgerError(f"audit index {path} belongs to another chain or contract")
            return conn, stored
        if domain is None:
            raise LedgerError(f"audit index {path} is empty: give a chain to build it")
        with Transaction(conn):
            for statement in (_SCHEMA + RULES_SCHEMA + CLAIMS_SCHEMA).split(";"):
                if statement.strip():
                    conn.execute(statement)
            value = domain.contract + domain.chain_id.to_bytes(32, "big")
            conn.execute("INSERT INTO meta VALUES ('domain', ?)", (value,))
            conn.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
        return conn, domain
    except sqlite3.Error as exc:
        conn.close()
        raise LedgerError(f"cannot open audit index {path}: {exc}") from exc
    except LedgerError:
        conn.close()
        raise


class Transaction:
    """``with``: one SQLite transaction, rolled back when the block raises (a failed write
    becomes LedgerError)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN")

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if exc is None:
            self._conn.execute("COMMIT")
            return
        self._conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise LedgerError(f"audit index write failed: {exc}") from exc


def nodes_blob(tree: MerkleTree) -> bytes:
    return b"".join(b"".join(level) for level in tree.levels)


def proof_from_blob(blob: bytes, count: int, index: int) -> list[bytes]:
    proof, offset, size = [], 0, count
    while size > 1:
        sibling = index ^ 1
        if sibling < size:
            start = offset + 32 * sibling
            proof.append(blob[start : start + 32])
        offset += 32 * size
        size, index = (size + 1) // 2, index // 2
    return proof


def address_bytes(addr: Any) -> bytes:
    return addr if isinstance(addr, bytes) else bytes.fromhex(str(addr).removeprefix("0x"))
