"""The edge's write-ahead journal: the source of truth for every record it acknowledged.

SQLite in WAL mode with ``synchronous=FULL``: :meth:`Journal.append` returns only after the
commit is on disk, so an edge acknowledges a task only once it survives ``kill -9`` or a
power cut. :meth:`Journal.append_many` is the group commit (one fsync for many records).
Batches are closed here (root and head computed once, then stored), and their anchoring
state is tracked: ``closed`` until a transaction anchored them, then ``anchored``.
"""

from __future__ import annotations

import sqlite3
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secure_ci.exceptions import JournalError, RecordError, SignatureError
from secure_ci.ledger._calldata import AnchoredRecord, BatchRecords, encode_batch
from secure_ci.ledger._merkle import MerkleTree, chain_head, leaf_hash, records_hash
from secure_ci.ledger._records import (
    REQUEST_ROW,
    RESULT_ROW,
    LedgerDomain,
    Signer,
    TaskRequest,
    TaskResult,
    recover_signer,
    sign_digest,
)

__all__ = ["Batch", "Journal", "JournalEntry", "sign_entry", "verify_entry"]

_REQ, _RES = REQUEST_ROW, RESULT_ROW
_GENESIS = bytes(32)
_FORMAT = b"3"  # 2: TaskRequest with prevRequest; 3: heads chain the records hash
MAX_CACHED = 1 << 14
MAX_CLOSED = 8  # batches whose root and calldata are kept from closing until anchored
"""Unanchored entries kept in memory to save reading them back (older ones are read from
disk): the cache stays bounded however long the chain is away."""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY, request BLOB NOT NULL, result BLOB NOT NULL,
    device_sig BLOB NOT NULL, edge_sig BLOB NOT NULL, record_hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    batch_id INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL, count INTEGER NOT NULL,
    root BLOB NOT NULL, prev_head BLOB NOT NULL, head BLOB NOT NULL,
    anchored INTEGER NOT NULL DEFAULT 0, tx_hash BLOB, block_number INTEGER,
    records_hash BLOB NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A record as the edge journals it: both signatures and the result's record hash."""

    request: TaskRequest
    result: TaskResult
    device_sig: bytes
    edge_sig: bytes
    record_hash: bytes

    def anchored(self) -> AnchoredRecord:
        return AnchoredRecord(self.request, self.result, self.device_sig)


@dataclass(frozen=True, slots=True)
class Batch:
    """A closed batch: records ``first_seq .. first_seq + count - 1`` of one edge.

    ``records_hash`` is keccak256 of the calldata the batch is anchored with (chained into
    ``head``); it changes only when the batch is anchored again with an epoch link."""

    batch_id: int
    first_seq: int
    count: int
    root: bytes
    prev_head: bytes
    head: bytes
    anchored: bool
    tx_hash: bytes | None
    block_number: int | None
    records_hash: bytes


class Journal:
    """One edge's journal in one SQLite file; use :meth:`open` as a context manager."""

    def __init__(self, conn: sqlite3.Connection, edge: bytes) -> None:
        self._conn = conn
        # one connection shared by the event loop and worker threads (to_thread(append_many))
        self._lock = threading.RLock()
        self.edge = edge
        # entries appended by this process and not yet anchored: saves reading them back
        self._recent: dict[int, JournalEntry] = {}
        # batches this process closed and has not anchored: (first seq, count, root, records
        # hash) and the calldata without an epoch link, as computed here, never read back
        self._closed: dict[int, tuple[tuple[int, int, bytes, bytes], bytes]] = {}
        self._next_seq = self._scalar("SELECT COALESCE(MAX(seq) + 1, 0) FROM records")
        self._batched = self._scalar("SELECT COALESCE(SUM(count), 0) FROM batches")
        self._next_batch = self._scalar("SELECT COUNT(*) FROM batches")
        last = self.batch(self._next_batch - 1) if self._next_batch else None
        self._head = last.head if last else _GENESIS
        if self._batched > self._next_seq or (
            last is not None and last.batch_id != self._next_batch - 1
        ):
            raise JournalError("journal is inconsistent: batches do not match records")

    @classmethod
    def open(cls, path: Path | str, *, edge: bytes) -> Journal:
        """Open or create the journal of ``edge`` (JournalError if unusable or not ours)."""
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key = 'edge'").fetchone()
            version = conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('edge', ?)", (edge,))
                conn.execute("INSERT INTO meta VALUES ('format', ?)", (_FORMAT,))
            elif bytes(row[0]) != edge:
                conn.close()
                raise JournalError("journal belongs to another edge")
            elif version is None or bytes(version[0]) != _FORMAT:
                conn.close()
                raise JournalError(
                    f"journal {path} has an older record format: let the version that wrote it"
                    " anchor it, then move it away"
                )
            return cls(conn, edge)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open journal {path}: {exc}") from exc

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield from self._tx_locked()

    def _tx_locked(self) -> Iterator[sqlite3.Connection]:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise JournalError(f"journal write failed: {exc}") from exc

    def _scalar(self, sql: str, *args: object) -> int:
        try:
            with self._lock:
                return int(self._conn.execute(sql, args).fetchone()[0])
        except (sqlite3.Error, TypeError, ValueError) as exc:
            raise JournalError(f"journal read failed: {exc}") from exc

    @property
    def next_seq(self) -> int:
        """The edge sequence number the next result must carry."""
        return self._next_seq

    @property
    def head(self) -> bytes:
        """The head of the batch chain after the last closed batch."""
        return self._head

    @property
    def batch_count(self) -> int:
        return self._next_batch

    @property
    def pending(self) -> int:
        """Records journaled but not yet in a closed batch."""
        return self._next_seq - self._batched

    @property
    def unanchored_records(self) -> int:
        """Records not yet known to be anchored (pending, or in unanchored batches)."""
        in_batches = self._scalar("SELECT COALESCE(SUM(count), 0) FROM batches WHERE anchored = 0")
        return self.pending + in_batches

    def append(self, entry: JournalEntry) -> None:
        """Durably journal one record (returns after fsync)."""
        self.append_many([entry])

    def append_many(self, entries: Sequence[JournalEntry]) -> None:
        """Group commit: durably journal records with consecutive edge sequence numbers."""
        rows = []
        pack_req, pack_res = _REQ.pack, _RES.pack
        for offset, e in enumerate(entries):
            r, q = e.result, e.request
            if r.edge_seq != self._next_seq + offset or q.edge != self.edge:
                raise JournalError(f"record out of order: expected seq {self._next_seq + offset}")
            rows.append(
                (
                    r.edge_seq,
                    pack_req(
                        q.task_id, q.device, q.device_seq, q.model_id, q.cut,
                        q.input_commitment, q.edge, q.deadline, q.prev_request,
                    ),
                    pack_res(
                        r.task_id, r.request_hash, r.output_commitment, r.measurement,
                        r.quote_id, r.status, r.latency_ms, r.edge_seq,
                    ),
                    e.device_sig,
                    e.edge_sig,
                    e.record_hash,
                )
            )  # fmt: skip
        with self._tx() as conn:
            conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)", rows)
        recent = self._recent
        for e in entries:
            recent[e.result.edge_seq] = e
        while len(recent) > MAX_CACHED:  # oldest first: dicts keep insertion order
            del recent[next(iter(recent))]
        self._next_seq += len(rows)

    def recent_requests(self, limit: int) -> list[tuple[bytes, bytes, int]]:
        """``(device, task id, deadline)`` of the last ``limit`` records, newest first."""
        rows = self._rows("SELECT request FROM records ORDER BY seq DESC LIMIT ?", limit)
        out = []
        for (raw,) in rows:
            try:
                q = TaskRequest(*_REQ.unpack(raw))
            except (struct.error, ValueError, TypeError) as exc:
                raise JournalError(f"journal records are corrupt: {exc}") from exc
            out.append((q.device, q.task_id, q.deadline))
        return out

    def kept_in_memory(self, entry: JournalEntry) -> bool:
        """True when ``entry`` is the one this process journalled (never read from disk)."""
        return self._recent.get(entry.result.edge_seq) is entry

    def entries(self, first_seq: int, count: int) -> list[JournalEntry]:
        """Journaled records ``first_seq .. first_seq + count - 1``."""
        cached = [self._recent.get(seq) for seq in range(first_seq, first_seq + count)]
        if all(e is not None for e in cached):
            return cached  # type: ignore[return-value]
        try:
            rows = self._rows(
                "SELECT seq, request, result, device_sig, edge_sig, record_hash FROM records"
                " WHERE seq >= ? AND seq < ? ORDER BY seq",
                first_seq,
                first_seq + count,
            )
            out = [
                JournalEntry(
                    TaskRequest(*_REQ.unpack(req)),
                    TaskResult(*_RES.unpack(res)),
                    bytes(dsig),
                    bytes(esig),
                    bytes(rh),
                )
                for _, req, res, dsig, esig, rh in rows
            ]
        except (sqlite3.Error, struct.error, ValueError) as exc:
            raise JournalError(f"journal records are corrupt: {exc}") from exc
        if [e.result.edge_seq for e in out] != list(range(first_seq, first_seq + len(out))):
            raise JournalError("journal records are corrupt: sequence numbers do not match")
        if len(out) != count:
            raise JournalError(f"journal lacks records {first_seq}..{first_seq + count - 1}")
        return out

    def close_batch(self, max_records: int) -> Batch | None:
        """Close the next batch from up to ``max_records`` pending records (None if none)."""
        with self._lock:  # atomic: the anchorer may close from a worker thread
            return self._close_batch_locked(max_records)

    def _close_batch_locked(self, max_records: int) -> Batch | None:
        count = min(max_records, self.pending)
        if count <= 0:
            return None
        first = self._batched
        entries = self.entries(first, count)
        root = MerkleTree.build(
            [leaf_hash(first + i, e.record_hash) for i, e in enumerate(entries)]
        ).root
        calldata = encode_batch(
            BatchRecords(self.edge, first, tuple(e.anchored() for e in entries))
        )
        digest = records_hash(calldata)
        head = chain_head(self._head, root, digest, first, count)
        batch = Batch(
            self._next_batch, first, count, root, self._head, head, False, None, None, digest
        )
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO batches (batch_id, first_seq, count, root, prev_head, head,"
                " records_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (batch.batch_id, first, count, root, batch.prev_head, head, digest),
            )
        if all(self.kept_in_memory(e) for e in entries):  # only then can it be used
            while len(self._closed) >= MAX_CLOSED:  # anchoring stalls: keep the newest
                del self._closed[min(self._closed)]
            self._closed[batch.batch_id] = ((first, count, root, digest), calldata)
        self._next_batch += 1
        self._batched += count
        self._head = head
        return batch

    def closed_here(self, batch: Batch) -> bytes | None:
        """The calldata (without an epoch link) of ``batch`` if this process closed it from
        entries it journalled itself and the stored root and records hash are still what it
        computed then (the host controls the file, not this memory); else None."""
        known = self._closed.get(batch.batch_id)
        stored = (batch.first_seq, batch.count, batch.root, batch.records_hash)
        return known[1] if known is not None and known[0] == stored else None

    def rehead(self, batch_id: int, new_records_hash: bytes) -> Batch:
        """Batch ``batch_id`` is anchored with other calldata (an epoch link): store its
        records hash and recompute its head and the heads of every later batch."""
        with self._lock:
            batch = self.batch(batch_id)
            digest, prev = new_records_hash, batch.prev_head
            with self._tx() as conn:
                for bid in range(batch_id, self._next_batch):
                    b = self.batch(bid) if bid != batch_id else batch
                    digest = digest if bid == batch_id else b.records_hash
                    head = chain_head(prev, b.root, digest, b.first_seq, b.count)
                    conn.execute(
                        "UPDATE batches SET prev_head = ?, head = ?, records_hash = ?"
                        " WHERE batch_id = ?",
                        (prev, head, digest, bid),
                    )
                    prev = head
            self._head = prev
            return self.batch(batch_id)

    def batch(self, batch_id: int) -> Batch:
        row = self._row(
            "SELECT batch_id, first_seq, count, root, prev_head, head, anchored, tx_hash,"
            " block_number, records_hash FROM batches WHERE batch_id = ?",
            batch_id,
        )
        if row is None:
            raise JournalError(f"journal has no batch {batch_id}")
        bid, first, count, root, prev, head, anchored, tx, block, digest = row
        return Batch(
            bid, first, count, bytes(root), bytes(prev), bytes(head), bool(anchored),
            bytes(tx) if tx is not None else None, block, bytes(digest),
        )  # fmt: skip

    def unanchored(self) -> list[int]:
        """Ids of closed batches not known to be anchored, in order."""
        rows = self._rows("SELECT batch_id FROM batches WHERE anchored = 0 ORDER BY batch_id")
        return [int(r[0]) for r in rows]

    def entry_for_request(self, request_hash: bytes) -> JournalEntry | None:
        """The journalled record answering the request with struct hash ``request_hash``
        (the first, if the edge answered it twice), None if the edge never answered it.

        A scan (the result row holds the request hash at bytes 32..64): for challenges, which
        are rare, not for the hot path."""
        row = self._row(
            "SELECT seq FROM records WHERE substr(result, 33, 32) = ? ORDER BY seq LIMIT 1",
            request_hash,
        )
        if row is None:
            return None
        return self.entries(int(row[0]), 1)[0]

    def batch_of_seq(self, seq: int) -> Batch | None:
        """The closed batch holding edge sequence number ``seq``, if any."""
        row = self._row(
            "SELECT batch_id FROM batches WHERE first_seq <= ? ORDER BY first_seq DESC LIMIT 1",
            seq,
        )
        if row is None:
            return None
        batch = self.batch(int(row[0]))
        return batch if seq < batch.first_seq + batch.count else None

    def mark_anchored(self, batch_id: int, tx_hash: bytes | None, block_number: int | None) -> None:
        """Record that ``batch_id`` is on chain (tx unknown when found on chain after a crash)."""
        batch = self.batch(batch_id)
        self._closed.pop(batch_id, None)
        for seq in range(batch.first_seq, batch.first_seq + batch.count):
            self._recent.pop(seq, None)
        with self._tx() as conn:
            conn.execute(
                "UPDATE batches SET anchored = 1, tx_hash = ?, block_number = ? WHERE batch_id = ?",
                (tx_hash, block_number, batch_id),
            )

    def mark_unanchored(self, from_batch_id: int) -> None:
        """Forget anchoring of batches ``>= from_batch_id`` (the chain lost them)."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE batches SET anchored = 0, tx_hash = NULL, block_number = NULL"
                " WHERE batch_id >= ?",
                (from_batch_id,),
            )

    def get_meta(self, key: str) -> bytes | None:
        row = self._row("SELECT value FROM meta WHERE key = ?", key)
        return None if row is None else bytes(row[0])

    def _rows(self, sql: str, *args: object) -> list[Any]:
        try:
            with self._lock:
                return self._conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from exc

    def _row(self, sql: str, *args: object) -> Any:
        try:
            with self._lock:
                return self._conn.execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from exc

    def set_meta(self, key: str, value: bytes) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def verify_entry(entry: JournalEntry, edge: bytes, domain: LedgerDomain) -> None:
    """Check a journal entry read back from the host's disk: the enclave (``edge``) signed its
    result, the result answers its request, and the device signed the request. JournalError
    otherwise: the host changed, swapped or forged it."""
    q, r = entry.request, entry.result
    where = f"journal record {r.edge_seq}"
    try:
        if q.edge != edge or not r.matches(q):
            raise JournalError(f"{where} does not answer its own request")
        if r.digest(domain) != entry.record_hash:
            raise JournalError(f"{where} does not hash to the record hash stored with it")
        if recover_signer(entry.edge_sig, entry.record_hash) != edge:
            raise JournalError(f"{where} is not signed by this enclave")
        if q.recover(entry.device_sig, domain) != q.device:
            raise JournalError(f"{where}: the request is not signed by its device")
    except (SignatureError, RecordError) as exc:
        raise JournalError(f"{where} does not verify: {exc}") from None


def sign_entry(
    request: TaskRequest,
    device_sig: bytes,
    result: TaskResult,
    edge_key: bytes | Signer,
    domain: LedgerDomain,
) -> JournalEntry:
    """Sign ``result`` with the enclave key and return the journal entry (hash computed once)."""
    record_hash = result.digest(domain)
    return JournalEntry(
        request, result, device_sig, sign_digest(edge_key, record_hash), record_hash
    )
