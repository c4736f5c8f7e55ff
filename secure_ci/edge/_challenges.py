"""The edge answers challenges before the window closes.

- A challenge of an enclave-signed result names it by its edge sequence number. The responder
  waits until the batch holding that number is anchored, builds the positional proof from the
  journal's record hashes and sends it; the contract checks it against the anchored root. A
  challenged record that differs from the journal's record at that number cannot be answered,
  and is logged as what it is: this enclave key signed two results for one sequence number.
- A request-only challenge names a device-signed request by its struct hash (the device got
  no result). The responder answers with the anchored record that answers that request and
  its positional proof (once its batch is anchored), or, when the journal has no record of
  the request, with an enclave-signed refusal (reason ``REFUSAL_NOT_RECEIVED``): either way
  the chain holds the edge's account of the request, and silence becomes an omission.
"""

from __future__ import annotations

import logging
from typing import Protocol

from eth_account.signers.local import LocalAccount

from secure_ci.ledger._integrity import REFUSAL_NOT_RECEIVED, refusal_digest
from secure_ci.ledger._journal import Batch, Journal, JournalEntry
from secure_ci.ledger._merkle import MerkleTree, leaf_hash
from secure_ci.ledger._records import LedgerDomain, sign_digest

__all__ = ["ChallengeResponder"]

log = logging.getLogger(__name__)
CHALLENGE_OPEN = 1


class ChallengeLedger(Protocol):
    @property
    def domain(self) -> LedgerDomain: ...

    async def block_number(self) -> int: ...

    async def opened_challenges(
        self, edge_addr: object, first: int, last: int
    ) -> list[tuple[int, int, bytes]]: ...

    async def challenge_info(self, challenge_id: int) -> object: ...

    async def respond_challenge(
        self, edge: LocalAccount, challenge_id: int, batch_id: int, proof: list[bytes]
    ) -> None: ...

    async def opened_request_challenges(
        self, edge_addr: object, first: int, last: int
    ) -> list[tuple[int, bytes]]: ...

    async def request_challenge_info(self, challenge_id: int) -> object: ...

    async def answer_request(
        self, caller: LocalAccount, challenge_id: int, result: object, batch_id: int,
        proof: list[bytes],
    ) -> int: ...  # fmt: skip

    async def refuse_request(
        self, caller: LocalAccount, challenge_id: int, reason: int, edge_sig: bytes
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
        self._requests: dict[int, bytes] = {}  # request challenge id -> request hash
        self.answered = 0
        self.refused = 0

    async def poll(self) -> int:
        """Read new challenges, answer every one whose batch is anchored; the number answered
        (refusals included)."""
        latest = await self._ledger.block_number()
        if latest >= self._next_block:
            address = self._account.address
            found = await self._ledger.opened_challenges(address, self._next_block, latest)
            for challenge_id, seq, record_hash in found:
                self._waiting[challenge_id] = (seq, record_hash)
            requests = await self._ledger.opened_request_challenges(
                address, self._next_block, latest
            )
            for challenge_id, request_hash in requests:
                self._requests[challenge_id] = request_hash
            self._next_block = latest + 1
        answered = 0
        for challenge_id, (seq, record_hash) in list(self._waiting.items()):
            if await self._answer_result(challenge_id, seq, record_hash):
                answered += 1
        for challenge_id, request_hash in list(self._requests.items()):
            if await self._answer_request(challenge_id, request_hash):
                answered += 1
        self.answered += answered
        return answered

    def _proof(self, batch: Batch, seq: int) -> tuple[list[JournalEntry], list[bytes]]:
        entries = self._journal.entries(batch.first_seq, batch.count)
        leaves = [leaf_hash(batch.first_seq + i, e.record_hash) for i, e in enumerate(entries)]
        return entries, MerkleTree.build(leaves).proof(seq - batch.first_seq)

    async def _answer_result(self, challenge_id: int, seq: int, record_hash: bytes) -> bool:
        info = await self._ledger.challenge_info(challenge_id)
        if getattr(info, "state", None) != CHALLENGE_OPEN:
            del self._waiting[challenge_id]  # answered, or the window closed
            return False
        batch = self._journal.batch_of_seq(seq)
        if batch is None or not batch.anchored:
            return False  # not anchored yet: the anchorer gets there first
        entries, proof = self._proof(batch, seq)
        if entries[seq - batch.first_seq].record_hash != record_hash:
            del self._waiting[challenge_id]
            log.error(
                "challenge %d names a record at %d that is not the journal's: this enclave"
                " key signed two results for one sequence number", challenge_id, seq,
            )  # fmt: skip
            return False
        await self._ledger.respond_challenge(self._account, challenge_id, batch.batch_id, proof)
        del self._waiting[challenge_id]
        log.info("answered challenge %d: record %d is in batch %d", challenge_id, seq,
                 batch.batch_id)  # fmt: skip
        return True

    async def _answer_request(self, challenge_id: int, request_hash: bytes) -> bool:
        info = await self._ledger.request_challenge_info(challenge_id)
        if getattr(info, "state", None) != CHALLENGE_OPEN:
            del self._requests[challenge_id]
            return False
        entry = self._journal.entry_for_request(request_hash)
        if entry is None:  # never reached the enclave (or never answered): say so, signed
            digest = refusal_digest(self._ledger.domain, request_hash, REFUSAL_NOT_RECEIVED)
            signature = sign_digest(bytes(self._account.key), digest)
            await self._ledger.refuse_request(
                self._account, challenge_id, REFUSAL_NOT_RECEIVED, signature
            )
            del self._requests[challenge_id]
            self.refused += 1
            log.warning(
                "refused request challenge %d: no record of request %s",
                challenge_id, request_hash.hex()[:16],
            )  # fmt: skip
            return True
        seq = entry.result.edge_seq
        batch = self._journal.batch_of_seq(seq)
        if batch is None or not batch.anchored:
            return False
        _, proof = self._proof(batch, seq)
        await self._ledger.answer_request(
            self._account, challenge_id, entry.result, batch.batch_id, proof
        )
        del self._requests[challenge_id]
        log.info("answered request challenge %d: record %d in batch %d", challenge_id, seq,
                 batch.batch_id)  # fmt: skip
        return True
