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

Findings are the rest of what an auditor must see (replays, unregistered devices, quote id
mismatches, late anchoring, request-chain gaps, equivocation against a challenge or a device
receipt; see ``_findings``): rules over several records are applied when a batch is indexed
(``_audit_rules``), equivocation when a record is read (``_audit_claims``), so a task's
findings are primary-key lookups. One bad batch (calldata that does not decode, is not
canonical, does not rebuild the root, or was not anchored by a direct call) is a finding
against its edge:
:meth:`AuditIndex.sync` skips it and indexes the rest of that edge's chain and every other
edge. Task ids are scoped by device everywhere: two devices' records under one task id are
never merged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from secure_ci.exceptions import ConfigError, ProofError, RecordError, SignatureError
from secure_ci.ledger._audit_claims import (
    add_receipts,
    claim_findings,
    claim_keys,
    has_claims,
    receipt_omissions,
    stored_seq,
)
from secure_ci.ledger._audit_receipts import DeviceReceipt
from secure_ci.ledger._audit_rules import all_stored_findings, stored_findings, stored_from
from secure_ci.ledger._audit_store import (
    SELECT_TASK_ID,
    SELECT_TASKS,
    open_index,
    proof_from_blob,
)
from secure_ci.ledger._audit_sync import AuditLedger, IndexWriter
from secure_ci.ledger._calldata import SIGNATURE_INTERVAL, AnchoredRecord
from secure_ci.ledger._findings import (
    DEFAULT_GRACE_SECONDS,
    Finding,
    FindingCode,
    late_anchoring,
)
from secure_ci.ledger._merkle import leaf_hash, verify_proof
from secure_ci.ledger._records import (
    REQUEST_ROW,
    RESULT_ROW,
    LedgerDomain,
    TaskRequest,
    TaskResult,
)

__all__ = ["AuditIndex", "AuditLedger", "IndexedTask", "VerifiedTask"]

_MANY = 256  # listing more tasks than this reads all stored findings at once


@dataclass(frozen=True, slots=True)
class IndexedTask:
    """A task as the index holds it, with its findings.

    ``next_seq`` is the edge sequence number of the next request of the device's chain in the
    same batch (-1 if none): it carries the device signature when the record's was left out.
    ``anchored_at`` is the anchoring block's timestamp (-1 if the index does not know it).
    """

    edge: bytes
    batch_id: int
    record: AnchoredRecord
    next_seq: int = -1
    anchored_at: int = -1
    findings: tuple[Finding, ...] = ()

    def as_json(self) -> dict[str, Any]:
        q, r = self.record.request, self.record.result
        out: dict[str, Any] = {"edge": "0x" + self.edge.hex(), "batch_id": self.batch_id}
        for obj in (q, r):
            for name in type(obj).__slots__:
                value = getattr(obj, name)
                out[name] = "0x" + value.hex() if isinstance(value, bytes) else value
        out["device_sig"] = "0x" + self.record.device_sig.hex()  # "0x": covered by chain_next_seq
        out["chain_next_seq"] = self.next_seq
        out["anchored_at"] = self.anchored_at
        out["findings"] = [{"code": str(f.code), "message": f.message} for f in self.findings]
        return out


@dataclass(frozen=True, slots=True)
class VerifiedTask:
    """A task that passed :meth:`AuditIndex.verify`, with its findings (verification holds,
    but an auditor must still see them)."""

    task: IndexedTask
    record_hash: bytes
    root: bytes
    proof: tuple[bytes, ...]
    findings: tuple[Finding, ...] = ()


class AuditIndex(IndexWriter):
    """A local SQLite index of anchored records (``":memory:"`` or a file path).

    The index remembers the domain (chain id, contract) it was built for; ``domain=None``
    opens an existing index with its own. ``grace_seconds`` is how long after a request's
    deadline its batch may be anchored before that is a late-anchoring finding.
    """

    def __init__(
        self,
        path: Path | str,
        domain: LedgerDomain | None = None,
        *,
        grace_seconds: int = DEFAULT_GRACE_SECONDS,
    ) -> None:
        if isinstance(grace_seconds, bool) or not 0 <= grace_seconds < 1 << 63:
            raise ConfigError("the anchoring grace must be a non-negative number of seconds")
        self.grace_seconds = int(grace_seconds)
        self._conn, self.domain = open_index(path, domain)
        self._receipts: dict[tuple[bytes, int, bytes], DeviceReceipt] = {}

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> AuditIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ queries

    def batch_findings(self, edge: bytes | None = None) -> list[Finding]:
        """The batches that could not be audited (one finding each), by edge and batch id."""
        sql = "SELECT edge, batch_id, code, message FROM batch_findings"
        rows = self._conn.execute(
            sql + (" WHERE edge = ?" if edge is not None else "") + " ORDER BY edge, batch_id",
            () if edge is None else (edge,),
        )
        return [Finding(FindingCode(c), str(m), bytes(e), int(b)) for e, b, c, m in rows]

    def findings(self, task: IndexedTask) -> tuple[Finding, ...]:
        """Every finding of one indexed record (indexed lookups, no scan)."""
        request, result = task.record.request, task.record.result
        stored = stored_findings(self._conn, task.edge, task.batch_id, request, result)
        return self._findings(task, stored, has_claims(self._conn))

    def _findings(
        self, task: IndexedTask, stored: list[tuple[FindingCode, str]], claims: bool
    ) -> tuple[Finding, ...]:
        request, result = task.record.request, task.record.result
        seq = result.edge_seq
        late = late_anchoring(request.deadline, task.anchored_at, self.grace_seconds)
        if late is not None:
            stored = [*stored, (FindingCode.LATE_ANCHORING, late)]
        if claims:
            stored = [
                *stored,
                *claim_findings(
                    self._conn, task.edge, seq, result.request_hash, result.digest(self.domain)
                ),
            ]
        return tuple(
            Finding(code, message, task.edge, task.batch_id, seq)
            for code, message in sorted(stored)
        )

    def _rows_to_tasks(self, rows: Iterable[Any]) -> Iterator[IndexedTask]:
        for edge, batch_id, req, res, sig, next_seq, anchored_at in rows:
            record = AnchoredRecord(
                TaskRequest(*REQUEST_ROW.unpack(req)),
                TaskResult(*RESULT_ROW.unpack(res)),
                bytes(sig),
            )
            yield IndexedTask(bytes(edge), int(batch_id), record, int(next_seq), int(anchored_at))

    def _with_findings(self, tasks: list[IndexedTask]) -> list[IndexedTask]:
        if len(tasks) <= _MANY:
            return [replace(t, findings=self.findings(t)) for t in tasks]
        stored, keys = all_stored_findings(self._conn), claim_keys(self._conn)
        return [
            replace(
                t,
                findings=self._findings(
                    t,
                    stored_from(stored, t.edge, t.batch_id, t.record.request, t.record.result),
                    (t.edge, t.record.result.edge_seq) in keys
                    or (t.edge, t.record.result.request_hash) in keys,
                ),
            )
            for t in tasks
        ]

    def add_receipts(self, receipts: list[DeviceReceipt]) -> int:
        """Hold verified device receipts (``parse_receipts``) for this connection's audit:
        records that differ from them get receipt-equivocation findings, and
        :meth:`receipt_omissions` lists those never anchored. Returns how many are held."""
        for r in receipts:
            self._receipts[
                (r.edge, stored_seq(r.result.edge_seq), r.result.digest(self.domain))
            ] = r
        return add_receipts(self._conn, self.domain, receipts)

    def receipt_omissions(self, now: int) -> list[tuple[DeviceReceipt, Finding]]:
        """The receipts whose task no batch anchored, with a receipt-omission finding each,
        once the chain's time ``now`` is past their deadline plus the grace."""
        out = []
        for edge, seq, record_hash, message in receipt_omissions(
            self._conn, now, self.grace_seconds
        ):
            receipt = self._receipts[(edge, seq, record_hash)]
            finding = Finding(
                FindingCode.RECEIPT_OMISSION, message, edge, -1, receipt.result.edge_seq
            )
            out.append((receipt, finding))
        return out

    def show(self, task_id: bytes, device: bytes | None = None) -> list[IndexedTask]:
        """Every indexed record of ``task_id`` (of ``device``, if given), ordered by device,
        edge and sequence number; each (device, task id) is its own task."""
        return self._with_findings(self._records_of(task_id, device))

    def _records_of(self, task_id: bytes, device: bytes | None) -> list[IndexedTask]:
        where, args = " WHERE t.task_id = ?", [task_id]
        if device is not None:
            where, args = where + " AND t.device = ?", [*args, device]
        rows = self._conn.execute(
            SELECT_TASK_ID + where + " ORDER BY t.device, t.edge, t.seq", args
        )
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
        for column, value in (("t.device", device), ("t.edge", edge), ("t.model_id", model)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("t.deadline >= ?")
            args.append(since)
        if until is not None:
            where.append("t.deadline < ?")
            args.append(until)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        sql = SELECT_TASKS + clause + " ORDER BY t.edge, t.seq LIMIT ?"
        return self._with_findings(
            list(self._rows_to_tasks(self._conn.execute(sql, (*args, limit))))
        )

    def last_anchored_at(self) -> int:
        """The latest anchoring block time the index holds (-1 if none)."""
        row = self._conn.execute("SELECT COALESCE(MAX(anchored_at), -1) FROM batches").fetchone()
        return int(row[0])

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])

    # ------------------------------------------------------------------ verification

    async def verify(
        self, task_id: bytes, ledger: AuditLedger | None, device: bytes | None = None
    ) -> list[VerifiedTask]:
        """Verify every indexed record of ``task_id`` (of ``device``, if given); raises on the
        first failure. Each result carries the record's findings.

        With ``ledger`` the batch's root and measurement are read from the chain now; with
        None they are those the chain held when the index was synced (no chain round trip).
        """
        tasks = self._records_of(task_id, device)
        if not tasks:
            raise RecordError(f"task 0x{task_id.hex()} is not in the index")
        return [await self.verify_task(t, ledger) for t in tasks]

    async def verify_task(self, task: IndexedTask, ledger: AuditLedger | None) -> VerifiedTask:
        """Verify one indexed record: proof against the chain's root, signatures, measurement;
        the result carries the record's findings."""
        request, result = task.record.request, task.record.result
        row = self._conn.execute(
            "SELECT first_seq, count, nodes, root, measurement, anchored_at FROM batches"
            " WHERE edge = ? AND batch_id = ?",
            (task.edge, task.batch_id),
        ).fetchone()
        if row is None:
            raise RecordError("the index lacks the task's batch")
        first_seq, count, nodes, root, measurement, anchored_at = row
        if not result.matches(request) or request.edge != task.edge:
            raise RecordError("result does not answer the request")
        if not 0 <= result.edge_seq - first_seq < count or not nodes:
            raise ProofError("the batch does not cover the task's sequence number")
        record_hash = result.digest(self.domain)
        proof = proof_from_blob(bytes(nodes), count, result.edge_seq - first_seq)
        if ledger is not None:
            info = await ledger.batch("0x" + task.edge.hex(), task.batch_id)
            if not info.first_seq <= result.edge_seq < info.first_seq + info.count:
                raise ProofError("the chain's batch does not cover the task's sequence number")
            root, measurement = info.root, info.measurement
        verify_proof(
            bytes(root),
            leaf_hash(result.edge_seq, record_hash),
            proof,
            result.edge_seq - first_seq,
            count,
        )
        self._check_device_signature(task)
        if bytes(measurement) != result.measurement:
            raise SignatureError("the result's measurement is not the one anchored with its batch")
        findings = self.findings(replace(task, anchored_at=int(anchored_at)))
        return VerifiedTask(task, record_hash, bytes(root), tuple(proof), findings)

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
            successor = TaskRequest(*REQUEST_ROW.unpack(row[0]))
            if (
                successor.prev_request != current.struct_hash()
                or successor.device != request.device
            ):
                raise SignatureError("the request chain that covers the device signature is broken")
            current, signature, next_seq = successor, bytes(row[1]), int(row[2])
        if not signature or current.recover(signature, self.domain) != request.device:
            raise SignatureError("device signature does not match the request's device")
