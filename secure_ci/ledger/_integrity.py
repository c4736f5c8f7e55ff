"""Fraud proofs and request-only challenges: the contract calls that hold an edge to what it
published.

- **Fraud proofs.** A batch commits to its published records (``keccak256(records)``, in the
  head chain). Anyone holding the records (the anchoring transaction's calldata) can have the
  contract decode them and rebuild the root (``proveFraud``); a record that breaks the
  encoding, or records that do not rebuild the anchored root, make the edge faulty for good:
  it cannot anchor again, cannot answer challenges, and its open challenges end as omissions
  at once. A proof against an honest batch reverts ``NoFraud``.
- **Request-only challenges.** A device that got no result holds only its own signed request
  (naming the edge). It opens a challenge with it; the edge must show, before the window
  closes, the anchored result of that request (its record and positional proof) or an
  enclave-signed refusal; otherwise the omission is recorded against the edge.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from secure_ci.exceptions import ContractRevertError, RecordError
from secure_ci.ledger._chain import (
    as_address,
    as_proof,
    as_task_request,
    as_task_result,
    as_uint,
)
from secure_ci.ledger._records import LedgerDomain, keccak256
from secure_ci.ledger._session import ContractSession

__all__ = [
    "REFUSAL_NOT_RECEIVED",
    "BatchFault",
    "IntegrityCalls",
    "RequestChallengeInfo",
    "refusal_digest",
]


class BatchFault(enum.IntEnum):
    """Why a batch's published records are fraudulent (the contract's BatchCalldata codes)."""

    TRUNCATED = 1
    TRAILING_BYTES = 2
    BAD_VERSION = 3
    HEADER_MISMATCH = 4
    RESERVED_BITS = 5
    BAD_INDEX = 6
    BAD_BACK_REFERENCE = 7
    NON_CANONICAL = 8
    ROOT_MISMATCH = 9


@dataclass(frozen=True)
class RequestChallengeInfo:
    """A request-only challenge; ``state`` 1 open, 2 answered with the anchored result, 3
    omission recorded, 4 refused by the enclave (``refusal`` holds its reason code)."""

    device: str
    edge: str
    state: int
    deadline: int
    request_hash: bytes
    refusal: int


class IntegrityCalls(ContractSession):
    """The ledger client's fraud-proof and request-challenge calls."""

    async def prove_fraud(
        self, caller: LocalAccount, edge_addr: object, batch_id: int, records: bytes
    ) -> BatchFault:
        """Prove batch ``batch_id`` of the edge fraudulent with its published ``records``;
        the fault the contract found (ContractRevertError NoFraud for an honest batch)."""
        fn = self._contract.functions.proveFraud(
            as_address(edge_addr, "edge"), as_uint(batch_id, "batch_id", 64), bytes(records)
        )
        receipt = await self._transact(caller, fn)
        return BatchFault(int(self._event_args("FraudProven", receipt)["fault"]))

    async def prove_fraud_gas(
        self, caller: LocalAccount, edge_addr: object, batch_id: int, records: bytes
    ) -> tuple[BatchFault, int]:
        """:meth:`prove_fraud` and the gas its transaction used (a metric)."""
        fn = self._contract.functions.proveFraud(
            as_address(edge_addr, "edge"), as_uint(batch_id, "batch_id", 64), bytes(records)
        )
        receipt = await self._transact(caller, fn)
        fault = BatchFault(int(self._event_args("FraudProven", receipt)["fault"]))
        return fault, int(receipt["gasUsed"])

    async def check_fraud(
        self, edge_addr: object, batch_id: int, records: bytes
    ) -> BatchFault | None:
        """What a fraud proof with ``records`` would establish, without sending it: the fault,
        or None for an honest batch (ContractRevertError for records that are not the
        batch's, an unknown batch, or a batch already proven)."""
        fn = self._contract.functions.proveFraud(
            as_address(edge_addr, "edge"), as_uint(batch_id, "batch_id", 64), bytes(records)
        )
        try:
            return BatchFault(int(await self._call(fn)))
        except ContractRevertError as exc:
            if exc.reason == "NoFraud":
                return None
            raise

    async def fraud_count(self, edge_addr: object) -> int:
        """Fraud proofs recorded against the edge (nonzero: the edge is faulty)."""
        fn = self._contract.functions.fraudCount(as_address(edge_addr, "edge"))
        return int(await self._call(fn))

    async def batch_fault(self, edge_addr: object, batch_id: int) -> BatchFault | None:
        """The fault proven against a batch, None if none was."""
        fn = self._contract.functions.batchFault(
            as_address(edge_addr, "edge"), as_uint(batch_id, "batch_id", 64)
        )
        code = int(await self._call(fn))
        return BatchFault(code) if code else None

    # ------------------------------------------------------------ request-only challenges

    async def challenge_request(
        self, device: LocalAccount, request: object, device_sig: bytes
    ) -> int:
        """Challenge the edge a signed request names (the device got no result); the id."""
        fn = self._contract.functions.challengeRequest(as_task_request(request), bytes(device_sig))
        receipt = await self._transact(device, fn)
        return int(self._event_args("RequestChallengeOpened", receipt)["challengeId"])

    async def challenge_request_once(
        self, device: LocalAccount, request: object, device_sig: bytes
    ) -> int:
        """:meth:`challenge_request`, or the id of the challenge already open for this
        request (a device that crashed after sending it, before writing it down, goes on)."""
        checked = as_task_request(request)
        request_hash = await self._call(self._contract.functions.hashTaskRequest(checked))
        existing = int(await self._call(self._contract.functions.requestChallengeOf(request_hash)))
        return existing or await self.challenge_request(device, request, device_sig)

    async def answer_request(
        self,
        caller: LocalAccount,
        challenge_id: int,
        result: object,
        batch_id: int,
        proof: Sequence[bytes],
    ) -> int:
        """Answer a request challenge with the anchored result and its positional proof;
        the gas used."""
        fn = self._contract.functions.answerRequest(
            as_uint(challenge_id, "challenge_id", 256),
            as_task_result(result),
            as_uint(batch_id, "batch_id", 64),
            as_proof(proof),
        )
        return int((await self._transact(caller, fn))["gasUsed"])

    async def refuse_request(
        self, caller: LocalAccount, challenge_id: int, reason: int, edge_sig: bytes
    ) -> None:
        """Record the enclave's signed refusal (:func:`refusal_digest`) of a request."""
        fn = self._contract.functions.refuseRequest(
            as_uint(challenge_id, "challenge_id", 256), as_uint(reason, "reason", 8), edge_sig
        )
        await self._transact(caller, fn)

    async def finalize_request_challenge(self, caller: LocalAccount, challenge_id: int) -> None:
        """After the window, record an unanswered request challenge as the edge's omission."""
        fn = self._contract.functions.finalizeRequestChallenge(
            as_uint(challenge_id, "challenge_id", 256)
        )
        await self._transact(caller, fn)

    async def request_challenge_info(self, challenge_id: int) -> RequestChallengeInfo:
        """A request challenge's parties, request and state."""
        fn = self._contract.functions.getRequestChallenge(
            as_uint(challenge_id, "challenge_id", 256)
        )
        device, deadline, state, refusal, edge, request_hash = await self._call(fn)
        return RequestChallengeInfo(device, edge, state, deadline, bytes(request_hash), refusal)

    async def opened_request_challenges(
        self, edge_addr: object, first: int, last: int
    ) -> list[tuple[int, bytes]]:
        """``(challenge id, request hash)`` of every request challenge opened against the
        edge in blocks ``first..last``."""
        with self._errors():
            logs = await self._contract.events.RequestChallengeOpened.get_logs(
                argument_filters={"edge": as_address(edge_addr, "edge")},
                from_block=first,
                to_block=last,
            )
        return [(int(e["args"]["challengeId"]), bytes(e["args"]["requestHash"])) for e in logs]


REFUSAL_TYPE = "TaskRefusal(bytes32 requestHash,uint8 reason)"
REFUSAL_NOT_RECEIVED = 1
"""Refusal reason: the edge has no record of the request (it never reached the enclave)."""


def refusal_digest(domain: LedgerDomain, request_hash: bytes, reason: int) -> bytes:
    """The EIP-712 digest an enclave signs to refuse the request with ``request_hash``."""
    if len(request_hash) != 32 or not 0 <= reason < 256:
        raise RecordError("a refusal names a 32-byte request hash and a uint8 reason")
    struct_hash = keccak256(
        keccak256(REFUSAL_TYPE.encode()) + request_hash + reason.to_bytes(32, "big")
    )
    return keccak256(b"\x19\x01" + domain.separator() + struct_hash)
