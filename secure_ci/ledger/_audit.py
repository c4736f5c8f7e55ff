"""Audit: read task records from anchoring calldata, index them, verify single tasks.

Any party with a node can audit every task, because each batch's records are in the calldata
of its anchoring transaction. :class:`AuditIndex` reads them once into SQLite (bulk inserts;
each batch's Merkle tree stored as one blob) so that a single-task audit is one indexed
lookup, a proof slice, a few hashes, two signature recoveries and two chain reads.

:meth:`AuditIndex.verify` checks, raising on the first failure: the leaf rebuilt from the
record is under the root *the chain* holds for that batch; the device signature recovers to
the request's device (or, where the batch left it out, the signature of a later request of
the device's chain, whose ``prevRequest`` hashes lead back to this one); the enclave is the
edge that anchored (the transaction that carried the records was sent by the edge's
registered enclave key, which the contract checks, so it stands for the per-record enclave
signature); the result's measurement is the one the contract recorded with the batch: the
edge's registered measurement when the batch was anchored, which the contract anchors only
while it is on the allow-list (a later re-registration, revocation or allow-list change
does not rewrite history: the batch's existence proves the edge was registered, active and
allowed when it anchored).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from secure_ci.exceptions import LedgerError, ProofError, RecordError, SignatureError
from secure_ci.ledger._calldata import (
    SIGNATURE_INTERVAL,
    AnchoredRecord,
    chain_links,
    chain_successors,
    decode_batch,
)
from secure_ci.ledger._merkle import MerkleTree, leaf_hash, verify_proof
from secure_ci.ledger._records import (
    REQUEST_ROW,
    RESULT_ROW,
    LedgerDomain,
    TaskRequest,
    TaskResult,
)

__all__ = ["AuditIndex", "AuditLedger", "IndexedTask", "VerifiedTask"]

_REQ, _RES = REQUEST_ROW, RESULT_ROW
_FORMAT = b"2"  # 2: chained requests (next_seq column)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    edge BLOB NOT NULL, batch_id INTEGER NOT NULL, first_seq INTEGER NOT NULL,
    count INTEGER NOT NULL, root BLOB NOT NULL, block_number INTEGER NOT NULL,
    nodes BLOB NOT NULL, measurement BLOB NOT NULL, PRIMARY KEY (edge, batch_id));
CREATE TABLE IF NOT EXISTS tasks (
    task_id BLOB NOT NULL, edge BLOB NOT NULL, batch_id INTEGER NOT NULL, seq INTEGER NOT NULL,
    device BLOB NOT NULL, model_id BLOB NOT NULL, deadline INTEGER NOT NULL,
    request BLOB NOT NULL, result BLOB NOT NULL, device_sig BLOB NOT NULL,
    next_seq INTEGER NOT NULL);
"""
_INDEXES = """
CREATE INDEX IF NOT EXISTS tasks_task ON tasks (task_id);
CREATE INDEX IF NOT EXISTS tasks_device ON tasks (device);
CREATE INDEX IF NOT EXISTS tasks_edge ON tasks (edge, seq);
"""
_COLUMNS = (
    "task_id, edge, batch_id, seq, device, model_id, deadline, request, result, device_sig,"
    " next_seq"
)
# Only constant column names and "?" placeholders are ever spliced into SQL.
_INSERT_TASK = f"INSERT INTO tasks ({_COLUMNS}) VALUES ({', '.join('?' * 11)})"  # noqa: S608
_SELECT_TASKS = f"SELECT {_COLUMNS} FROM tasks"  # noqa: S608


class AuditLedger(Protocol):
    """The part of ``LedgerClient`` an auditor needs."""

    chain_id: int
    address: Any

    async def edge_state(self, addr: Any) -> Any: ...
    async def batch(self, addr: Any, batch_id: int) -> Any: ...
    async def batch_calldata(self, addr: Any, batch_id: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class IndexedTask:
    """A task as the index holds it.

    ``next_seq`` is the edge sequence number of the next request of the device's chain in the
    same batch (-1 if none): it carries the device signature when the record's was left out.
    """

    edge: bytes
    batch_id: int
    record: AnchoredRecord
    next_seq: int = -1

    def as_json(self) -> dict[str, Any]:
        q, r = self.record.request, self.record.result
        out: dict[str, Any] = {"edge": "0x" + self.edge.hex(), "batch_id": self.batch_id}
        for obj in (q, r):
            for name in type(obj).__slots__:
                value = getattr(obj, name)
                out[name] = "0x" + value.hex() if isinstance(value, bytes) else value
        out["device_sig"] = "0x" + self.record.device_sig.hex()  # "0x": covered by chain_next_seq
        out["chain_next_seq"] = self.next_seq
        return out


@dataclass(frozen=True, slots=True)
class VerifiedTask:
    """A task that passed :meth:`AuditIndex.verify`."""

    task: IndexedTask
    record_hash: bytes
    root: bytes
    proof: tuple[bytes, ...]


def _nodes_blob(tree: MerkleTree) -> bytes:
    return b"".join(b"".join(level) for level in tree.levels)


def _proof_from_blob(blob: bytes, count: int, index: int) -> list[bytes]:
    proof, offset, size = [], 0, count
    while size > 1:
        sibling = index ^ 1
        if sibling < size:
            start = offset + 32 * sibling
            proof.append(blob[start : start + 32])
        offset += 32 * size
        size, index = (size + 1) // 2, index // 2
    return proof


def _hex(addr: Any) -> bytes:
    return addr if isinstance(addr, bytes) else bytes.fromhex(str(addr).removeprefix("0x"))


class AuditIndex:
    """A local SQLite index of anchored records (``":memory:"`` or a file path).

    The index remembers the domain (chain id, contract) it was built for; ``domain=None``
    opens an existing index with its own.
    """

    def __init__(self, path: Path | str, domain: LedgerDomain | None = None) -> None:
        try:
            self._conn = sqlite3.connect(str(path), isolation_level=None)
            self._conn.executescript(_SCHEMA + _INDEXES)
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'domain'").fetchone()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open audit index {path}: {exc}") from exc
        try:
            version = self._conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read audit index {path}: {exc}") from exc
        if row is not None and (version is None or bytes(version[0]) != _FORMAT):
            self._conn.close()
            raise LedgerError(f"audit index {path} has an older format: delete it to rebuild it")
        stored = None
        if row is not None:
            raw = bytes(row[0])
            stored = LedgerDomain(int.from_bytes(raw[20:], "big"), raw[:20])
        if domain is None:
            if stored is None:
                self._conn.close()
                raise LedgerError(f"audit index {path} is empty: give a chain to build it")
            domain = stored
        elif stored is None:
            value = domain.contract + domain.chain_id.to_bytes(32, "big")
            self._conn.execute("INSERT INTO meta VALUES ('domain', ?)", (value,))
            self._conn.execute("INSERT INTO meta VALUES ('format', ?)", (_FORMAT,))
        elif stored != domain:
            self._conn.close()
            raise LedgerError(f"audit index {path} belongs to another chain or contract")
        self.domain = domain

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> AuditIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_batch(
        self,
        edge: bytes,
        batch_id: int,
        root: bytes,
        block_number: int,
        calldata: bytes,
        measurement: bytes,
        *,
        first_seq: int | None = None,
        count: int | None = None,
    ) -> int:
        """Index one anchored batch from its calldata; return the number of records.

        ``root``, ``first_seq``, ``count`` and the batch's ``measurement`` are as the
        chain holds them. Calldata that does not rebuild exactly the anchored root over exactly
        the anchored sequence range is refused: records outside it were never committed.
        """
        batch = decode_batch(calldata)
        if batch.edge != edge:
            raise RecordError("batch calldata names another edge")
        if first_seq is not None and batch.first_seq != first_seq:
            raise ProofError(f"calldata starts at seq {batch.first_seq}, the chain at {first_seq}")
        if count is not None and len(batch.records) != count:
            raise ProofError(f"calldata has {len(batch.records)} records, the chain {count}")
        leaves = [leaf_hash(r.result.edge_seq, r.result.digest(self.domain)) for r in batch.records]
        tree = MerkleTree.build(leaves)
        if tree.root != root:
            raise ProofError("the records in calldata do not rebuild the anchored Merkle root")
        successors = chain_successors(chain_links(batch.records))
        rows = (
            (
                r.request.task_id, edge, batch_id, r.result.edge_seq, r.request.device,
                r.request.model_id, r.request.deadline,
                _REQ.pack(*(getattr(r.request, f) for f in TaskRequest.__slots__)),
                _RES.pack(*(getattr(r.result, f) for f in TaskResult.__slots__)),
                r.device_sig, batch.first_seq + nxt if nxt >= 0 else -1,
            )
            for r, nxt in zip(batch.records, successors, strict=True)
        )  # fmt: skip
        nodes = _nodes_blob(tree)
        try:
            self._conn.execute("BEGIN")
            self._conn.execute(
                "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    edge,
                    batch_id,
                    batch.first_seq,
                    len(leaves),
                    root,
                    block_number,
                    nodes,
                    measurement,
                ),
            )
            self._conn.executemany(_INSERT_TASK, rows)
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._conn.execute("ROLLBACK")
            raise LedgerError(f"audit index write failed: {exc}") from exc
        return len(leaves)

    def next_batch(self, edge: bytes) -> int:
        row = self._conn.execute(
            "SELECT COALESCE(MAX(batch_id) + 1, 0) FROM batches WHERE edge = ?", (edge,)
        ).fetchone()
        return int(row[0])

    async def sync(self, ledger: AuditLedger, edges: Iterable[Any]) -> int:
        """Index every batch of ``edges`` the index lacks; return the number of records added."""
        added = 0
        for addr in edges:
            edge = _hex(addr)
            state = await ledger.edge_state("0x" + edge.hex())
            for batch_id in range(self.next_batch(edge), int(state.next_batch_id)):
                info = await ledger.batch("0x" + edge.hex(), batch_id)
                calldata = await ledger.batch_calldata("0x" + edge.hex(), batch_id)
                added += self.add_batch(
                    edge,
                    batch_id,
                    bytes(info.root),
                    int(info.block_number),
                    calldata,
                    bytes(info.measurement),
                    first_seq=int(info.first_seq),
                    count=int(info.count),
                )
        return added

    def _rows_to_tasks(self, rows: Iterable[Any]) -> Iterator[IndexedTask]:
        for _task, edge, batch_id, _s, _d, _m, _dl, req, res, sig, next_seq in rows:
            record = AnchoredRecord(
                TaskRequest(*_REQ.unpack(req)), TaskResult(*_RES.unpack(res)), bytes(sig)
            )
            yield IndexedTask(bytes(edge), int(batch_id), record, int(next_seq))

    def show(self, task_id: bytes) -> list[IndexedTask]:
        """Every indexed record of ``task_id`` (more than one means several edges ran it)."""
        rows = self._conn.execute(_SELECT_TASKS + " WHERE task_id = ?", (task_id,))
        return list(self._rows_to_tasks(rows))

    def tasks(
        self,
        *,
        device: bytes | None = None,
        edge: bytes | None = None,
        model: bytes | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 1000,
    ) -> list[IndexedTask]:
        """Tasks filtered by device, edge, model and deadline in ``[since, until)``."""
        where: list[str] = []
        args: list[object] = []
        for column, value in (("device", device), ("edge", edge), ("model_id", model)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("deadline >= ?")
            args.append(since)
        if until is not None:
            where.append("deadline < ?")
            args.append(until)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        sql = _SELECT_TASKS + clause + " ORDER BY edge, seq LIMIT ?"
        return list(self._rows_to_tasks(self._conn.execute(sql, (*args, limit))))

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])

    async def verify(self, task_id: bytes, ledger: AuditLedger | None) -> list[VerifiedTask]:
        """Verify every indexed record of ``task_id`` (raises on the first failure).

        With ``ledger`` the batch's root and measurement are read from the chain now; with
        None they are those the chain held when the index was synced (no chain round trip).
        """
        tasks = self.show(task_id)
        if not tasks:
            raise RecordError(f"task 0x{task_id.hex()} is not in the index")
        return [await self.verify_task(t, ledger) for t in tasks]

    async def verify_task(self, task: IndexedTask, ledger: AuditLedger | None) -> VerifiedTask:
        """Verify one indexed record: proof against the chain's root, signatures, measurement."""
        request, result = task.record.request, task.record.result
        row = self._conn.execute(
            "SELECT first_seq, count, nodes, root, measurement FROM batches"
            " WHERE edge = ? AND batch_id = ?",
            (task.edge, task.batch_id),
        ).fetchone()
        if row is None:
            raise RecordError("the index lacks the task's batch")
        first_seq, count, nodes, root, measurement = row
        if not result.matches(request) or request.edge != task.edge:
            raise RecordError("result does not answer the request")
        if not 0 <= result.edge_seq - first_seq < count:
            raise ProofError("the batch does not cover the task's sequence number")
        record_hash = result.digest(self.domain)
        proof = _proof_from_blob(bytes(nodes), count, result.edge_seq - first_seq)
        if ledger is not None:
            info = await ledger.batch("0x" + task.edge.hex(), task.batch_id)
            if not info.first_seq <= result.edge_seq < info.first_seq + info.count:
                raise ProofError("the chain's batch does not cover the task's sequence number")
            root, measurement = info.root, info.measurement
        verify_proof(bytes(root), leaf_hash(result.edge_seq, record_hash), proof)
        self._check_device_signature(task)
        if bytes(measurement) != result.measurement:
            raise SignatureError("the result's measurement is not the one anchored with its batch")
        return VerifiedTask(task, record_hash, bytes(root), tuple(proof))

    def _check_device_signature(self, task: IndexedTask) -> None:
        """The device signed the request, directly or through a later request of its chain.

        A batch leaves out a signature when the next request of the chain is in the batch:
        that request's ``prevRequest`` is this request's struct hash, so its signature (or,
        in turn, its successor's) covers this one. At most ``SIGNATURE_INTERVAL`` steps.
        """
        request, signature, next_seq = task.record.request, task.record.device_sig, task.next_seq
        current = request
        for _ in range(SIGNATURE_INTERVAL):
            if signature:
                break
            row = self._conn.execute(
                "SELECT request, device_sig, next_seq FROM tasks WHERE edge = ? AND seq = ?",
                (task.edge, next_seq),
            ).fetchone()
            if next_seq < 0 or row is None:
                raise SignatureError("the device signature is missing and no request covers it")
            successor = TaskRequest(*_REQ.unpack(row[0]))
            if (
                successor.prev_request != current.struct_hash()
                or successor.device != request.device
            ):
                raise SignatureError("the request chain that covers the device signature is broken")
            current, signature, next_seq = successor, bytes(row[1]), int(row[2])
        if not signature or current.recover(signature, self.domain) != request.device:
            raise SignatureError("device signature does not match the request's device")
