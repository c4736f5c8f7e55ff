"""The anchorer: closes journal batches and anchors them on the ledger, idempotently.

A batch closes every ``max_seconds`` or ``max_records`` records. The journal is the source of
truth and the chain the witness, so after a restart :meth:`Anchorer.sync` compares the two
and re-anchors exactly the batches the chain lacks:

- chain has batches ``0..k-1`` with our head after ``k-1``: anchor ``k..``;
- chain has more batches than the journal, or another head: refuse (LedgerError), the chain
  or the journal belongs to someone else;
- chain lost batches we had anchored (a dev chain restarted): a new **epoch**. Batches are
  deterministic (same records, boundaries, roots and heads), so they are anchored again from
  the first batch the chain lacks; the first of them carries, in its calldata, the last head
  the previous epoch reached and that epoch's number (see ``_calldata``), which links the
  epochs for auditors. Heads chain the records hash (keccak256 of the calldata), so that
  batch and the ones after it get new heads (``Journal.rehead``). Records keep their sequence
  numbers and signatures; this needs the same chain id and contract address (a deterministic
  redeploy), which fix the EIP-712 domain.

The epoch, its link and the last batch anchored (with the head the chain returned) live in an
:class:`~secure_ci.ledger._epoch.EpochStore` (the edge's sealed store; in memory by default),
never in the journal, whose file the host can write. :meth:`Anchorer.sync` decides from them
whether the chain lost what this enclave anchored and which head the link names, and saves a
new epoch state before it marks the lost batches unanchored in the journal; a crash between
the two finds the chain at the sealed batch on the next sync (no second epoch) and marks them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from secure_ci.exceptions import JournalError, LedgerError
from secure_ci.ledger._calldata import MAX_BATCH_RECORDS, BatchRecords, encode_batch
from secure_ci.ledger._epoch import (
    AnchoredHead,
    EpochLink,
    EpochState,
    EpochStore,
    MemoryEpochStore,
)
from secure_ci.ledger._journal import Batch, Journal, JournalEntry, verify_entry
from secure_ci.ledger._merkle import MerkleTree, chain_head, leaf_hash, records_hash
from secure_ci.ledger._records import LedgerDomain

__all__ = ["MAX_ANCHOR_RECORDS", "AnchorLedger", "Anchorer"]

log = logging.getLogger(__name__)
_LEGACY_META = ("epoch", "epoch_link")  # older edges kept the epoch state in the journal
_warned_legacy: weakref.WeakSet[Journal] = weakref.WeakSet()
MAX_ANCHOR_RECORDS = MAX_BATCH_RECORDS
"""The contract's ``MAX_BATCH_RECORDS``: a fraud proof decodes every record of a batch, so
batches stay small enough for one to fit in a transaction."""


class AnchorLedger(Protocol):
    """The part of ``LedgerClient`` the anchorer needs."""

    @property
    def domain(self) -> LedgerDomain: ...

    async def edge_state(self, addr: Any) -> Any: ...

    async def anchor_batch(
        self,
        edge_acct: Any,
        batch_id: int,
        root: bytes,
        first_seq: int,
        count: int,
        prev_head: bytes,
        records: bytes,
    ) -> Any: ...


def _address(account: Any) -> bytes:
    return bytes.fromhex(str(account.address).removeprefix("0x"))


class Anchorer:
    """Anchor one edge's journal on a ledger; own it from one asyncio task."""

    def __init__(
        self,
        journal: Journal,
        ledger: AnchorLedger,
        edge_account: Any,
        *,
        max_records: int = 512,
        max_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        epoch_state: EpochStore | None = None,
    ) -> None:
        """``epoch_state`` keeps the epoch and its link (see ``_epoch``): the edge passes its
        sealed store's; without one they live in memory for this anchorer's lifetime."""
        if max_records < 1 or max_seconds <= 0:
            raise LedgerError("max_records and max_seconds must be positive")
        if max_records > MAX_ANCHOR_RECORDS:  # the contract's cap: every batch stays provable
            log.warning("batches close at %d records (the contract's cap)", MAX_ANCHOR_RECORDS)
            max_records = MAX_ANCHOR_RECORDS
        if _address(edge_account) != journal.edge:
            raise JournalError("the journal belongs to another edge key")
        self.journal = journal
        self.ledger = ledger
        self.account = edge_account
        self.max_records = max_records
        self.max_seconds = max_seconds
        self.clock = clock
        self.epoch_store: EpochStore = MemoryEpochStore() if epoch_state is None else epoch_state
        self._state: EpochState | None = None
        if journal not in _warned_legacy and any(journal.get_meta(k) for k in _LEGACY_META):
            _warned_legacy.add(journal)
            log.warning(
                "the journal's meta table holds an epoch state from an older edge: ignored "
                "(the host can write the journal; the epoch state is kept sealed now)"
            )
        self._pending_since: float | None = None
        self._synced = False
        self.gas_used = 0
        """Gas of the anchoring transactions this anchorer sent (a metric)."""

    @property
    def epoch(self) -> int:
        return self._epoch_state().epoch

    def _epoch_state(self) -> EpochState:
        """The epoch state, read once per anchorer. A store that has none yet (a fresh edge, or
        one older than the sealed state) starts from the journal's last anchored batch: the
        host could have rewritten that, which is no worse than putting back an old sealed file
        (see ``_epoch``)."""
        if self._state is None:
            state = self.epoch_store.load()
            if state is None:
                state = EpochState(anchored=self._journal_anchored())
                if state.anchored is not None:
                    log.warning(
                        "no epoch state in the store yet: starting it from the journal, whose "
                        "batch %d is the last anchored (an edge older than the sealed epoch "
                        "state, or the file was deleted)",
                        state.anchored.batch_id,
                    )
                self.epoch_store.save(state)
            self._state = state
        return self._state

    def _journal_anchored(self) -> AnchoredHead | None:
        unanchored = set(self.journal.unanchored())
        for batch_id in reversed(range(self.journal.batch_count)):
            if batch_id not in unanchored:
                return AnchoredHead(batch_id, self.journal.batch(batch_id).head)
        return None

    async def sync(self) -> int:
        """Reconcile journal and chain; return how many batches the journal had as anchored
        that the chain lacks. Whether the chain lost batches this enclave anchored, and the
        head the last of them reached, come from the epoch state, not from the journal."""
        current = self._epoch_state()  # first: a missing or unreadable one changes nothing
        state = await self.ledger.edge_state(self.account.address)
        if not state.registered or not getattr(state, "active", True):
            raise LedgerError("edge key is not registered (or revoked) on the ledger")
        k, n = int(state.next_batch_id), self.journal.batch_count
        if k > n:
            raise JournalError(f"chain has {k} batches of this edge, the journal only {n}")
        if k > 0 and bytes(state.head) != self.journal.batch(k - 1).head:
            raise LedgerError("the chain's batch head diverges from the journal")
        unanchored = self.journal.unanchored()
        for b in unanchored:  # anchored before a crash let us record it
            if b < k:
                self.journal.mark_anchored(b, None, None)
        last = current.anchored
        if last is not None and last.batch_id >= k:  # the chain lost what we anchored
            on_chain = AnchoredHead(k - 1, bytes(state.head)) if k else None
            new = EpochState(current.epoch + 1, EpochLink(k, last.head, current.epoch), on_chain)
            log.warning(
                "chain lost %d anchored batches; epoch %d", last.batch_id - k + 1, new.epoch
            )
            # sealed before the journal changes: a crash in between finds the chain at the
            # sealed batch next time (no new epoch) and the journal's flags marked below
            await asyncio.to_thread(self.epoch_store.save, new)
            self._state = new
        flagged = sorted(set(range(k, n)) - set(unanchored))
        if flagged:
            self.journal.mark_unanchored(k)
        self._synced = True
        return len(flagged)

    def due(self) -> bool:
        """True when a batch should close now (size or age)."""
        pending = self.journal.pending
        if pending == 0:
            self._pending_since = None
            return False
        now = self.clock()
        if self._pending_since is None:
            self._pending_since = now
        return pending >= self.max_records or now - self._pending_since >= self.max_seconds

    async def flush(self) -> list[Any]:
        """Close every pending record into batches and anchor all unanchored batches."""
        return await self._close_and_anchor(full_only=False)

    async def _close_and_anchor(self, *, full_only: bool) -> list[Any]:
        """Close pending records (only whole ``max_records`` batches when ``full_only``: a
        transaction's cost is mostly fixed, so a due-by-size batch leaves its remainder to
        the next one) and anchor every unanchored batch."""
        if not self._synced:
            await self.sync()
        close = self.journal.close_batch
        # journal writes wait for an fsync: worker threads keep the event loop (the edge) going
        while not full_only or self.journal.pending >= self.max_records:
            if await asyncio.to_thread(close, self.max_records) is None:
                break
        self._pending_since = None
        receipts = []
        for batch_id in self.journal.unanchored():
            receipts.append(await self._anchor(self.journal.batch(batch_id)))
        return receipts

    def _after_link(self, batch_id: int) -> bool:
        """True for a batch re-anchored after this epoch's link: its stored records hash may
        still hold the link an earlier epoch put in it (the chain lost batches again, further
        back), so it is re-headed with its records as they are now. Everything anchored is
        recomputed from verified entries either way: the stored hash is only a cache."""
        link = self._epoch_state().link
        return link is not None and batch_id > link.batch_id

    def _link_for(self, batch_id: int) -> tuple[bytes, int] | None:
        link = self._epoch_state().link
        if link is None or link.batch_id != batch_id:
            return None
        return link.prev_head, link.prev_epoch

    def _checked(self, batch: Batch) -> list[JournalEntry]:
        """The batch's entries, each verified unless this process journalled it itself, and
        the stored root and head recomputed from them: the host controls the journal file, and
        the enclave never anchors a record it did not sign (JournalError otherwise)."""
        journal, domain = self.journal, self.ledger.domain
        entries = journal.entries(batch.first_seq, batch.count)
        checked = 0
        for entry in entries:
            if not journal.kept_in_memory(entry):
                verify_entry(entry, journal.edge, domain)
                checked += 1
        if not checked and journal.closed_here(batch) is not None:
            root = batch.root  # computed here from these very entries when it closed
        else:
            leaves = [leaf_hash(e.result.edge_seq, e.record_hash) for e in entries]
            root = MerkleTree.build(leaves).root
        if (
            root != batch.root
            or chain_head(batch.prev_head, root, batch.records_hash, batch.first_seq, batch.count)
            != batch.head
        ):
            raise JournalError(
                f"journal batch {batch.batch_id} was changed on disk (its root or head is not "
                "its records'): refusing to anchor it"
            )
        if checked:
            log.info("verified %d journal records read back from disk", checked)
        return entries

    async def _anchor(self, batch: Batch) -> Any:
        entries = await asyncio.to_thread(self._checked, batch)
        link = self._link_for(batch.batch_id)
        calldata = self.journal.closed_here(batch) if link is None else None
        if calldata is None or any(not self.journal.kept_in_memory(e) for e in entries):
            calldata = encode_batch(
                BatchRecords(
                    self.journal.edge, batch.first_seq, tuple(e.anchored() for e in entries), link
                )
            )
        digest = records_hash(calldata)
        if digest != batch.records_hash:
            if link is None and not self._after_link(batch.batch_id):  # host tampering
                raise JournalError(
                    f"journal batch {batch.batch_id} was changed on disk (its records hash is"
                    " not its records'): refusing to anchor it"
                )
            batch = await asyncio.to_thread(self.journal.rehead, batch.batch_id, digest)
        receipt = await self.ledger.anchor_batch(
            self.account,
            batch.batch_id,
            batch.root,
            batch.first_seq,
            batch.count,
            batch.prev_head,
            calldata,
        )
        if bytes(receipt.new_head) != batch.head:
            raise LedgerError(f"batch {batch.batch_id}: the chain computed another head")
        await asyncio.to_thread(
            self.journal.mark_anchored, batch.batch_id, bytes(receipt.tx_hash), receipt.block_number
        )
        anchored = AnchoredHead(batch.batch_id, bytes(receipt.new_head))
        self._state = replace(self._epoch_state(), anchored=anchored)
        await asyncio.to_thread(self.epoch_store.save, self._state)
        self.gas_used += int(receipt.gas_used)
        log.info(
            "anchored batch %d (records %d..%d) in block %d",
            batch.batch_id, batch.first_seq, batch.first_seq + batch.count - 1,
            receipt.block_number,
        )  # fmt: skip
        return receipt

    async def run(self, *, poll_seconds: float = 0.05, stop: asyncio.Event | None = None) -> None:
        """Anchor due batches until cancelled or ``stop`` is set (then flush what is left)."""
        await self.sync()
        if self.journal.unanchored():  # closed before a crash or a chain reset: anchor now
            await self._close_and_anchor(full_only=True)
        while stop is None or not stop.is_set():
            if self.due():
                aged = self.clock() - (self._pending_since or 0.0) >= self.max_seconds
                await self._close_and_anchor(full_only=not aged)
            await asyncio.sleep(poll_seconds)
        await self.flush()
