"""Building the audit index from the chain: batches, their records, bad batches, registry.

:meth:`IndexWriter.sync` reads every batch the index lacks, checks each batch's calldata
against what the chain anchored and indexes its records with their findings
(``_audit_rules``). A bad batch is stored as a finding against its edge and skipped; the
rest of that edge's chain and every other edge are still indexed. Only a failing node
(ChainError, an unexpected revert) stops a sync: nothing is known about that batch yet, and
the next sync resumes where this one stopped.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from typing import Any, Protocol

from secure_ci.exceptions import ChainError, ContractRevertError, LedgerError, RecordError
from secure_ci.ledger._audit_chain import (
    ChallengeHistory,
    RegistryHistory,
    challenge_history,
    registry_history,
)
from secure_ci.ledger._audit_claims import add_challenge_events
from secure_ci.ledger._audit_rules import add_registry_events, apply_batch_rules, request_key
from secure_ci.ledger._audit_store import (
    INSERT_BATCH,
    INSERT_TASK,
    Transaction,
    address_bytes,
    nodes_blob,
)
from secure_ci.ledger._calldata import BatchRecords, chain_links, chain_successors
from secure_ci.ledger._findings import BadBatch, FindingCode, check_batch
from secure_ci.ledger._merkle import MerkleTree
from secure_ci.ledger._records import REQUEST_ROW, RESULT_ROW, LedgerDomain, TaskRequest, TaskResult

__all__ = ["AuditLedger", "IndexWriter"]

_log = logging.getLogger(__name__)


class AuditLedger(Protocol):
    """The part of ``LedgerClient`` an auditor needs."""

    chain_id: int
    address: Any

    async def edge_state(self, addr: Any) -> Any: ...
    async def batch(self, addr: Any, batch_id: int) -> Any: ...
    async def batch_calldata(self, addr: Any, batch_id: int) -> bytes: ...


class IndexWriter:
    """The writing half of :class:`AuditIndex` (over its connection and domain)."""

    _conn: sqlite3.Connection
    domain: LedgerDomain

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
        anchored_at: int = -1,
    ) -> int:
        """Index one anchored batch from its calldata; return the number of records.

        ``root``, ``first_seq``, ``count``, the batch's ``measurement`` and ``anchored_at``
        (its block's timestamp) are as the chain holds them. Calldata that does not rebuild
        exactly the anchored root over exactly the anchored sequence range is refused (raises;
        :meth:`sync` records it as a finding instead): records outside it were never committed.
        """
        checked = check_batch(self.domain, edge, calldata, root, first_seq, count)
        if isinstance(checked, BadBatch):
            raise checked.error()
        batch, tree = checked
        return self._insert(edge, batch_id, block_number, measurement, anchored_at, batch, tree)

    def _insert(
        self,
        edge: bytes,
        batch_id: int,
        block_number: int,
        measurement: bytes,
        anchored_at: int,
        batch: BatchRecords,
        tree: MerkleTree,
    ) -> int:
        links = chain_links(batch.records)
        successors = chain_successors(links)
        rows = (
            (
                r.request.task_id, edge, batch_id, r.result.edge_seq, r.request.device,
                r.request.model_id, r.request.deadline,
                REQUEST_ROW.pack(*(getattr(r.request, f) for f in TaskRequest.__slots__)),
                RESULT_ROW.pack(*(getattr(r.result, f) for f in TaskResult.__slots__)),
                r.device_sig, batch.first_seq + nxt if nxt >= 0 else -1,
                request_key(r.result.request_hash),
            )
            for r, nxt in zip(batch.records, successors, strict=True)
        )  # fmt: skip
        covered = self._registry_block()
        registry_block = block_number if covered is not None and covered >= block_number else None
        batch_row = (
            edge, batch_id, batch.first_seq, len(batch.records), tree.root, block_number,
            nodes_blob(tree), measurement, anchored_at,
        )  # fmt: skip
        with Transaction(self._conn):
            if self._has_batch(edge, batch_id):
                raise RecordError(f"batch {batch_id} of 0x{edge.hex()} is already indexed")
            last = self._conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM tasks").fetchone()[0]
            self._conn.execute(INSERT_BATCH, batch_row)
            self._conn.executemany(INSERT_TASK, rows)
            apply_batch_rules(self._conn, edge, batch_id, batch, links, int(last), registry_block)
        return len(batch.records)

    def _add_bad_batch(
        self, edge: bytes, batch_id: int, info: Any, anchored_at: int, bad: BadBatch
    ) -> None:
        """Keep a batch that cannot be audited (no records, no tree) and its finding."""
        with Transaction(self._conn):
            self._conn.execute(
                INSERT_BATCH,
                (
                    edge, batch_id, int(info.first_seq), int(info.count), bytes(info.root),
                    int(info.block_number), b"", bytes(info.measurement), anchored_at,
                ),
            )  # fmt: skip
            self._conn.execute(
                "INSERT INTO batch_findings VALUES (?, ?, ?, ?)",
                (edge, batch_id, str(bad.code), bad.message),
            )
        _log.info("batch %d of 0x%s is not audited: %s", batch_id, edge.hex(), bad.message)

    def _has_batch(self, edge: bytes, batch_id: int) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM batches WHERE edge = ? AND batch_id = ?", (edge, batch_id)
        ).fetchone()
        return row is not None

    def _registry_block(self) -> int | None:
        """The last block whose registry events the index holds (None: no registry)."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'registry_block'").fetchone()
        return None if row is None else int(bytes(row[0]))

    def next_batch(self, edge: bytes) -> int:
        """The first batch id of ``edge`` the index lacks."""
        row = self._conn.execute(
            "SELECT COALESCE(MAX(batch_id) + 1, 0) FROM batches WHERE edge = ?", (edge,)
        ).fetchone()
        return int(row[0])

    async def sync(
        self,
        ledger: AuditLedger,
        edges: Iterable[Any],
        *,
        history: RegistryHistory | None = None,
        from_block: int = 0,
        challenges: ChallengeHistory | None = None,
    ) -> int:
        """Index every batch of ``edges`` the index lacks; return the number of records added.

        A bad batch becomes a finding against its edge (``batch_findings``) and is skipped;
        node failures raise. ``history`` (default: read from ``ledger``'s contract) gives the
        registry events from ``from_block`` on and block times; a ledger without one (an
        in-memory fake) is indexed without the registry and late-anchoring rules.
        ``challenges`` (default: read from ``ledger``'s contract, like ``history``) gives the
        challenge events that equivocation findings compare records with.
        """
        reads = history if history is not None else registry_history(ledger)
        claims = challenges if challenges is not None else challenge_history(ledger)
        if claims is not None:
            await self._sync_challenges(claims, from_block)
        pending = []
        for addr in edges:
            edge = address_bytes(addr)
            state = await ledger.edge_state("0x" + edge.hex())
            for batch_id in range(self.next_batch(edge), int(state.next_batch_id)):
                pending.append((edge, batch_id, await ledger.batch("0x" + edge.hex(), batch_id)))
        if not pending:
            return 0
        if reads is None:
            _log.warning(
                "%s has no registry history: registration, quote id and late-anchoring"
                " findings are not checked",
                type(ledger).__name__,
            )
        else:
            last = max(int(info.block_number) for *_, info in pending)
            await self._sync_registry(reads, last, from_block)
        times: dict[int, int] = {}
        added = 0
        for edge, batch_id, info in pending:
            block = int(info.block_number)
            if reads is not None and block not in times:
                times[block] = await reads.block_timestamp(block)
            checked = await self._checked(ledger, edge, batch_id, info)
            if isinstance(checked, BadBatch):
                self._add_bad_batch(edge, batch_id, info, times.get(block, -1), checked)
            else:
                added += self._insert(
                    edge, batch_id, block, bytes(info.measurement), times.get(block, -1), *checked
                )
        return added

    async def _checked(
        self, ledger: AuditLedger, edge: bytes, batch_id: int, info: Any
    ) -> tuple[BatchRecords, MerkleTree] | BadBatch:
        try:
            calldata = await ledger.batch_calldata("0x" + edge.hex(), batch_id)
        except (ChainError, ContractRevertError):
            raise  # the node failed: nothing is known about the batch yet
        except LedgerError as exc:  # the anchoring transaction was not a direct call
            return BadBatch(FindingCode.BATCH_NOT_DIRECT_CALL, str(exc))
        return check_batch(
            self.domain, edge, calldata, bytes(info.root), int(info.first_seq), int(info.count)
        )

    async def _sync_challenges(self, reads: ChallengeHistory, from_block: int) -> None:
        """Store the challenge events up to the chain's latest block."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'challenge_block'").fetchone()
        first = from_block if row is None else int(bytes(row[0])) + 1
        last = await reads.block_number()
        if last < first:
            return
        events = await reads.challenge_events(first, last)
        with Transaction(self._conn):
            add_challenge_events(self._conn, events)
            self._conn.execute(
                "INSERT OR REPLACE INTO meta VALUES ('challenge_block', ?)", (str(last).encode(),)
            )

    async def _sync_registry(self, reads: RegistryHistory, target: int, from_block: int) -> None:
        """Store the registry events up to at least block ``target``."""
        covered = self._registry_block()
        if covered is not None and covered >= target:
            return
        first = from_block if covered is None else covered + 1
        last = max(target, await reads.block_number())
        events = await reads.registry_events(first, last)
        with Transaction(self._conn):
            add_registry_events(self._conn, events)
            self._conn.execute(
                "INSERT OR REPLACE INTO meta VALUES ('registry_block', ?)", (str(last).encode(),)
            )
