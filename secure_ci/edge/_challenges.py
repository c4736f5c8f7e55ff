"""The edge answers challenges: a device that forced one of its records onto the chain gets
the record's inclusion proof, from the journal, before the challenge window closes.

A challenge names an enclave-signed result (the contract checked the signature) by its edge
sequence number. The responder waits until the batch holding that number is anchored, builds
the positional proof from the journal's record hashes and sends it; the contract checks it
against the anchored root. A challenged record that differs from the journal's record at that
number cannot be answered, and is logged as what it is: this enclave key signed two results
for one sequence number.
"""

from __future__ import annotations

import logging
from typing import Protocol

from eth_account.signers.local import LocalAccount

from secure_ci.ledger._journal import Journal
from secure_ci.ledger._merkle import MerkleTree, leaf_hash

__all__ = ["ChallengeResponder"]

log = logging.getLogger(__name__)
CHALLENGE_OPEN = 1


class ChallengeLedger(Protocol):
    async def block_number(self) -> int: ...

    async def opened_challenges(
        self, edge_addr: object, first: int, last: int
    ) -> list[tuple[int, int, bytes]]: ...

    async def challenge_info(self, challenge_id: int) -> object: ...

    async def respond_challenge(
        self, edge: LocalAccount, challenge_id: int, batch_id: int, proof: list[bytes]
    ) -> None: ...


class ChallengeResponder:
    """Answers the challenges against one edge; :meth:`poll` from one task."""

    def __init__(
        self, ledger: ChallengeLedger, journal: Journal, account: LocalAccount, first_block: int
    ) -> None:
        self._ledger = ledger
        self._journal = journal
        self._account = account
        self._next_block = first_block
        self._waiting: dict[int, tuple[int, bytes]] = {}  # challenge id -> (seq, record hash)
        self.answered = 0

    async def poll(self) -> int:
        """Read new challenges, answer every one whose batch is anchored; the number answered."""
        latest = await self._ledger.block_number()
        if latest >= self._next_block:
            found = await self._ledger.opened_challenges(
                self._account.address, self._next_block, latest
            )
            for challenge_id, seq, record_hash in found:
                self._waiting[challenge_id] = (seq, record_hash)
            self._next_block = latest + 1
        answered = 0
        for challenge_id, (seq, record_hash) in list(self._waiting.items()):
            info = await self._ledger.challenge_info(challenge_id)
            if getattr(info, "state", None) != CHALLENGE_OPEN:
                del self._waiting[challenge_id]  # answered, or the window closed
                continue
            batch = self._journal.batch_of_seq(seq)
            if batch is None or not batch.anchored:
                continue  # not anchored yet: the anchorer gets there first
            entries = self._journal.entries(batch.first_seq, batch.count)
            index = seq - batch.first_seq
            if entries[index].record_hash != record_hash:
                del self._waiting[challenge_id]
                log.error(
                    "challenge %d names a record at %d that is not the journal's: this enclave"
                    " key signed two results for one sequence number", challenge_id, seq,
                )  # fmt: skip
                continue
            leaves = [leaf_hash(batch.first_seq + i, e.record_hash) for i, e in enumerate(entries)]
            proof = MerkleTree.build(leaves).proof(index)
            await self._ledger.respond_challenge(self._account, challenge_id, batch.batch_id, proof)
            del self._waiting[challenge_id]
            answered += 1
            self.answered += 1
            log.info("answered challenge %d: record %d is in batch %d", challenge_id, seq,
                     batch.batch_id)  # fmt: skip
        return answered
