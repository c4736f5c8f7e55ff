"""LedgerClient: the async web3 binding of the SecureCILedger contract.

``open_ledger("inprocess")`` runs an embedded EVM and deploys the contract; an ``http://`` URL
talks to any JSON-RPC node (anvil in tests, geth/besu in production) and deploys unless
``contract_address`` is given. Transactions are signed locally by the ``LocalAccount`` that
is responsible for them (owner, party admin, edge enclave key, device key). Reverts become
:class:`ContractRevertError` whose reason is the contract's custom error name; node and
transport failures become :class:`ChainError`. web3 never leaks out of this package.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from eth_account.signers.local import LocalAccount
from hexbytes import HexBytes
from web3.exceptions import Web3Exception

from secure_ci.exceptions import ChainError, ContractRevertError, LedgerError, RecordError
from secure_ci.ledger._anchor_tx import anchor_call_data, anchor_gas_limit, anchored_head
from secure_ci.ledger._chain import (
    AnchorReceipt,
    BatchAnchoredEvent,
    BatchInfo,
    ChallengeInfo,
    DisputeInfo,
    EdgeInfo,
    EdgeState,
    as_address,
    as_bytes32,
    as_opening,
    as_proof,
    as_task_request,
    as_task_result,
    as_uint,
)
from secure_ci.ledger._governance import (
    RELEASE_MEASUREMENT,
    RELEASE_MODEL,
    GovernanceCalls,
)
from secure_ci.ledger._integrity import IntegrityCalls
from secure_ci.ledger._records import KeyRegistration
from secure_ci.ledger._registry import RegistryReads

__all__ = ["LedgerClient"]


DEFAULT_RELEASE_SECONDS = 7 * 24 * 3600
"""How long a release added by :meth:`LedgerClient.allow_measurement` (or a model by
:meth:`LedgerClient.register_model`) stays valid: a week, then it is renewed or it expires."""


class LedgerClient(GovernanceCalls, RegistryReads, IntegrityCalls):
    """Calls and transactions on one deployed SecureCILedger; create it with open_ledger."""

    # ------------------------------------------------------------------ registry

    async def register_party(self, admin: object) -> int:
        """Propose a party administered by ``admin`` as the session's (deployer's) party and
        execute it; its id. Needs a threshold of 1 (else LedgerError naming the proposal)."""
        proposed = await self.propose_party(self.owner, admin)
        await self.execute_if_ready(self.owner, proposed)
        await self.require_executed(proposed, "adding a party")
        return await self.party_of(admin)

    async def allow_measurement(self, m: bytes, allowed: bool = True) -> None:
        """Release an enclave measurement for a week from now (proposed and executed by the
        session's party; a suspended one gets its suspension lifted), or, with
        ``allowed=False``, suspend it. Needs a threshold of 1 (else LedgerError)."""
        m = as_bytes32(m, "measurement")
        release = await self.release(RELEASE_MEASUREMENT, m)
        if not allowed:
            if not release.suspended:
                await self.suspend(self.owner, RELEASE_MEASUREMENT, m)
            return
        if release.suspended:
            proposed = await self.propose_lift(self.owner, RELEASE_MEASUREMENT, m)
        else:
            now = await self.timestamp()
            proposed = await self.propose_release(
                self.owner, RELEASE_MEASUREMENT, m, now, now + DEFAULT_RELEASE_SECONDS
            )
        await self.execute_if_ready(self.owner, proposed)
        await self.require_executed(proposed, "allowing a measurement")

    async def register_device(
        self, admin: LocalAccount, party_id: int, device: object, proof: bytes | None = None
    ) -> None:
        """Register a device key for the party ``admin`` administers.

        ``proof`` is the device key's signature of its :class:`KeyRegistration`; when
        ``device`` is an account holding its key (``.key``), it is made here.
        """
        address = as_address(device, "device")
        registration = KeyRegistration(party_id, bytes.fromhex(address[2:]))
        proof = await self._possession(registration, device, proof)
        fn = self._contract.functions.registerDevice(
            as_uint(party_id, "party_id", 64), address, proof
        )
        await self._transact(admin, fn)

    async def register_edge(
        self,
        admin: LocalAccount,
        party_id: int,
        edge_key: object,
        measurement: bytes,
        quote_id: bytes,
        endpoint: str,
        proof: bytes | None = None,
    ) -> None:
        """Register (or re-attest) an edge's enclave key for the party ``admin`` administers.

        ``proof`` is the enclave key's signature of its :class:`KeyRegistration` (detail:
        measurement, quote id, endpoint); made here when ``edge_key`` holds its key.
        """
        address = as_address(edge_key, "edge_key")
        measurement = as_bytes32(measurement, "measurement")
        quote_id = as_bytes32(quote_id, "quote_id")
        detail = KeyRegistration.edge_detail(measurement, quote_id, endpoint)
        registration = KeyRegistration(party_id, bytes.fromhex(address[2:]), detail)
        proof = await self._possession(registration, edge_key, proof)
        fn = self._contract.functions.registerEdge(
            as_uint(party_id, "party_id", 64), address, measurement, quote_id, endpoint, proof
        )
        await self._transact(admin, fn)

    async def registration_nonce(self, key: object) -> int:
        """The nonce the next :class:`KeyRegistration` proof of ``key`` must carry."""
        fn = self._contract.functions.registrationNonce(as_address(key, "key"))
        return int(await self._call(fn))

    async def _possession(
        self, registration: KeyRegistration, holder: object, proof: bytes | None
    ) -> bytes:
        if proof is not None:
            return bytes(proof)
        key = getattr(holder, "key", None)
        if key is None:
            raise RecordError(
                "registering a key needs its proof of possession: pass the account holding the"
                " key, or proof= (the key's signature of KeyRegistration with its nonce)"
            )
        nonce = await self.registration_nonce(holder)
        return dataclasses.replace(registration, nonce=nonce).sign(bytes(key), self.domain)

    async def register_model(
        self,
        admin: LocalAccount,
        party_id: int,
        model_id: bytes,
        sources: Sequence[bytes] = (),
    ) -> None:
        """Release a model id owned by the party ``admin`` administers, valid for a week from
        now (proposed by ``admin`` and executed). Needs a threshold of 1 (else LedgerError)."""
        now = await self.timestamp()
        proposed = await self.propose_release(
            admin, RELEASE_MODEL, as_bytes32(model_id, "model_id"), now,
            now + DEFAULT_RELEASE_SECONDS, sources, party_id=party_id,
        )  # fmt: skip
        await self.execute_if_ready(admin, proposed)
        await self.require_executed(proposed, "registering a model")

    async def revoke_device(self, admin: LocalAccount, device: object) -> None:
        """Revoke a device of the party ``admin`` administers."""
        fn = self._contract.functions.revokeDevice(as_address(device, "device"))
        await self._transact(admin, fn)

    async def revoke_edge(self, admin: LocalAccount, edge: object) -> None:
        """Revoke an edge of the party ``admin`` administers (it can no longer anchor)."""
        fn = self._contract.functions.revokeEdge(as_address(edge, "edge"))
        await self._transact(admin, fn)

    async def is_registered_device(self, addr: object) -> bool:
        """True when ``addr`` is an active device key."""
        fn = self._contract.functions.isRegisteredDevice(as_address(addr))
        return bool(await self._call(fn))

    async def is_allowed_measurement(self, m: bytes) -> bool:
        """True when the measurement is a release valid now (approved, in its validity window,
        not suspended): edges register and devices connect only then."""
        return await self.release_valid(RELEASE_MEASUREMENT, m)

    async def model_party(self, model_id: bytes) -> int:
        """The party owning ``model_id`` (0 when unregistered)."""
        fn = self._contract.functions.modelParty(as_bytes32(model_id, "model_id"))
        return int(await self._call(fn))

    async def contract_owner(self) -> str:
        """The deployer: the admin of party 1 (one party among the governing parties)."""
        return await self.party_admin(1)

    async def party_count(self) -> int:
        """How many parties were registered (ids are 1..count)."""
        return int(await self._call(self._contract.functions.partyCount()))

    async def challenge_window(self) -> int:
        """Seconds an edge has to answer a challenge."""
        return int(await self._call(self._contract.functions.challengeWindow()))

    async def edges(self) -> list[str]:
        """Every edge key ever registered, in registration order."""
        count = int(await self._call(self._contract.functions.edgeCount()))
        return [str(await self._call(self._contract.functions.edgeKeys(i))) for i in range(count)]

    async def edge_state(self, edge_addr: object) -> EdgeState:
        """The edge's batch chain, omissions and registration."""
        fn = self._contract.functions.edgeState(as_address(edge_addr, "edge"))
        nb, ns, head, omissions, registered, active, measurement = await self._call(fn)
        return EdgeState(nb, ns, bytes(head), omissions, registered, bytes(measurement), active)

    async def edge_info(self, edge_addr: object) -> EdgeInfo:
        """The edge's owning party, quote id and endpoint."""
        fn = self._contract.functions.edgeInfo(as_address(edge_addr, "edge"))
        party_id, quote_id, endpoint = await self._call(fn)
        return EdgeInfo(party_id, bytes(quote_id), endpoint)

    # ------------------------------------------------------------------ batches

    async def anchor_batch(
        self,
        edge: LocalAccount,
        batch_id: int,
        root: bytes,
        first_seq: int,
        count: int,
        prev_head: bytes,
        records: bytes,
    ) -> AnchorReceipt:
        """Anchor the edge's next batch, sent (and so signed) by its enclave key.

        The hot path of every edge: the transaction is encoded, sized and signed here (see
        ``_anchor_tx``) instead of through web3's contract and gas-estimation machinery.
        A revert is mined (and reported as ContractRevertError with the custom error).
        """
        data = anchor_call_data(
            as_uint(batch_id, "batch_id", 64),
            as_bytes32(root, "root"),
            as_uint(first_seq, "first_seq", 64),
            as_uint(count, "count", 32),
            as_bytes32(prev_head, "prev_head"),
            bytes(records),
        )
        receipt = await self._send_data(edge, data, anchor_gas_limit(data))
        return AnchorReceipt(
            bytes(receipt["transactionHash"]),
            int(receipt["blockNumber"]),
            int(receipt["gasUsed"]),
            anchored_head(receipt, self.address),
        )

    async def _send_data(self, account: LocalAccount, data: bytes, gas: int) -> Any:
        """Sign and send a call of this contract with ``data`` and an explicit gas limit."""
        lock = self._locks.setdefault(account.address, asyncio.Lock())
        async with lock:
            with self._errors():
                eth = self._w3.eth
                tx: dict[str, Any] = {
                    "to": self.address,
                    "data": data,
                    "gas": gas,
                    "gasPrice": await eth.gas_price,
                    "nonce": await eth.get_transaction_count(account.address, "pending"),
                    "chainId": self.chain_id,
                    "value": 0,
                }
                try:
                    tx_hash = await eth.send_raw_transaction(
                        account.sign_transaction(tx).raw_transaction
                    )
                except Web3Exception:  # rejected (funds, nonce): a revert explains it better
                    await eth.call({"from": account.address, "to": self.address, "data": data})
                    raise
                receipt = await eth.wait_for_transaction_receipt(
                    tx_hash, timeout=self._receipt_timeout, poll_latency=0.02
                )
                if receipt["status"] != 1:  # replay as a call to learn the custom error
                    await eth.call({"from": account.address, "to": self.address, "data": data})
        if receipt["status"] != 1:
            raise ContractRevertError("transaction reverted")
        return receipt

    async def batch(self, edge_addr: object, batch_id: int) -> BatchInfo:
        """The stored batch (reverts with UnknownBatch if it was never anchored)."""
        fn = self._contract.functions.batchInfo(
            as_address(edge_addr, "edge"), as_uint(batch_id, "batch_id", 64)
        )
        root, first_seq, count, block_number, measurement = await self._call(fn)
        return BatchInfo(bytes(root), first_seq, count, block_number, bytes(measurement))

    async def batch_records_hash(self, edge_addr: object, batch_id: int) -> bytes:
        """keccak256 of the records the batch published (UnknownBatch if never anchored)."""
        fn = self._contract.functions.batchRecordsHash(
            as_address(edge_addr, "edge"), as_uint(batch_id, "batch_id", 64)
        )
        return bytes(await self._call(fn))

    async def batches(
        self, edge_addr: object | None = None, from_block: int = 0
    ) -> list[BatchAnchoredEvent]:
        """BatchAnchored events from ``from_block`` on, for one edge or all."""
        filters = {} if edge_addr is None else {"edge": as_address(edge_addr, "edge")}
        return await self._batch_events(filters, from_block, "latest")

    async def _batch_events(
        self, filters: dict[str, Any], from_block: int, to_block: int | str
    ) -> list[BatchAnchoredEvent]:
        with self._errors():
            logs = await self._contract.events.BatchAnchored.get_logs(
                argument_filters=filters, from_block=from_block, to_block=to_block
            )
        return [
            BatchAnchoredEvent(
                str(log["args"]["edge"]),
                int(log["args"]["batchId"]),
                bytes(log["args"]["root"]),
                int(log["args"]["firstSeq"]),
                int(log["args"]["count"]),
                bytes(log["args"]["newHead"]),
                int(log["blockNumber"]),
                bytes(log["transactionHash"]),
            )
            for log in logs
        ]

    async def batch_calldata(self, edge_addr: object, batch_id: int) -> bytes:
        """The ``records`` argument of the transaction that anchored the batch."""
        edge = as_address(edge_addr, "edge")
        info = await self.batch(edge, batch_id)
        filters = {"edge": edge, "batchId": batch_id}
        events = await self._batch_events(filters, info.block_number, info.block_number)
        if not events:
            raise ChainError(f"no BatchAnchored log for batch {batch_id} of {edge}")
        with self._errors():
            tx = await self._w3.eth.get_transaction(HexBytes(events[0].tx_hash))
        if str(tx.get("to", "")).lower() != self.address.lower():
            raise LedgerError(f"batch {batch_id}: not anchored by a direct call")
        try:
            fn, args = self._contract.decode_function_input(tx["input"])
        except (ValueError, Web3Exception) as exc:
            raise LedgerError(f"batch {batch_id}: not anchored by a direct call") from exc
        if fn.abi_element_identifier != "anchorBatch(uint64,bytes32,uint64,uint32,bytes32,bytes)":
            raise LedgerError(f"batch {batch_id}: anchoring transaction calls {fn.fn_name}")
        if args["batchId"] != batch_id or bytes(args["root"]) != info.root:
            raise LedgerError(f"batch {batch_id}: anchoring transaction does not match the batch")
        return bytes(args["records"])

    async def verify_task(
        self, edge_addr: object, batch_id: int, seq: int, record_hash: bytes, proof: Sequence[bytes]
    ) -> bool:
        """The contract's own check of an inclusion proof."""
        fn = self._contract.functions.verifyTask(
            as_address(edge_addr, "edge"),
            as_uint(batch_id, "batch_id", 64),
            as_uint(seq, "seq", 64),
            as_bytes32(record_hash, "record_hash"),
            as_proof(proof),
        )
        return bool(await self._call(fn))

    async def hash_task_result(self, result: object) -> bytes:
        """The record hash (EIP-712 digest) of a TaskResult as the contract computes it."""
        fn = self._contract.functions.hashTaskResult(as_task_result(result))
        return bytes(await self._call(fn))

    # ------------------------------------------------------------------ challenges, disputes

    async def challenge(self, device: LocalAccount, result: object, edge_sig: bytes) -> int:
        """Force an edge-signed result onto the chain; the challenge id."""
        fn = self._contract.functions.challenge(as_task_result(result), bytes(edge_sig))
        receipt = await self._transact(device, fn)
        return int(self._event_args("ChallengeOpened", receipt)["challengeId"])

    async def challenge_once(self, device: LocalAccount, result: object, edge_sig: bytes) -> int:
        """:meth:`challenge`, or the id of the challenge already open for this record (a
        device that crashed after sending it, before writing it down, goes on)."""
        record_hash = await self.hash_task_result(result)
        existing = int(await self._call(self._contract.functions.challengeOf(record_hash)))
        return existing or await self.challenge(device, result, edge_sig)

    async def respond_challenge(
        self, edge: LocalAccount, challenge_id: int, batch_id: int, proof: Sequence[bytes]
    ) -> None:
        """Answer a challenge with the inclusion proof of the challenged record."""
        fn = self._contract.functions.respondChallenge(
            as_uint(challenge_id, "challenge_id", 256),
            as_uint(batch_id, "batch_id", 64),
            as_proof(proof),
        )
        await self._transact(edge, fn)

    async def finalize_challenge(self, caller: LocalAccount, challenge_id: int) -> None:
        """After the window, record an unanswered challenge as the edge's omission."""
        fn = self._contract.functions.finalizeChallenge(as_uint(challenge_id, "challenge_id", 256))
        await self._transact(caller, fn)

    async def challenge_info(self, challenge_id: int) -> ChallengeInfo:
        """A challenge's parties, record and state."""
        fn = self._contract.functions.getChallenge(as_uint(challenge_id, "challenge_id", 256))
        device, seq, state, edge, deadline, record_hash = await self._call(fn)
        return ChallengeInfo(device, edge, seq, state, deadline, bytes(record_hash))

    async def dispute(self, caller: LocalAccount, evidence: Sequence[object]) -> int:
        """Record a k-way dispute (2 <= k <= 8) over one task's results; the dispute id.

        Each piece of ``evidence`` is a device's ``TaskReceipt`` (``request``, ``result``,
        ``edge_sig``, ``opening``) or a tuple ``(request, result, edge signature, opening)``.
        The contract checks the openings and compares canonical digests: agreeing results
        revert ``SameOutput``; with a strict majority every other edge gets a dissent.
        Anyone holding the openings may file.
        """
        return (await self.dispute_gas(caller, evidence))[0]

    async def dispute_gas(
        self, caller: LocalAccount, evidence: Sequence[object]
    ) -> tuple[int, int]:
        """:meth:`dispute` and the gas its transaction used (a metric)."""
        requests, results, signatures, openings = [], [], [], []
        for item in evidence:
            if isinstance(item, tuple | list):
                if len(item) != 4:
                    raise RecordError("dispute evidence: (request, result, signature, opening)")
                request, result, signature, opening = item
            else:
                request, result = getattr(item, "request", None), getattr(item, "result", None)
                signature, opening = getattr(item, "edge_sig", None), getattr(item, "opening", None)
            if opening is None or not isinstance(signature, bytes):
                raise RecordError("dispute evidence needs each result's signature and opening")
            requests.append(as_task_request(request))
            results.append(as_task_result(result))
            signatures.append(bytes(signature))
            openings.append(as_opening(opening))
        fn = self._contract.functions.dispute(requests, results, signatures, openings)
        receipt = await self._transact(caller, fn)
        return int(self._event_args("DisputeRecorded", receipt)["disputeId"]), int(
            receipt["gasUsed"]
        )

    async def dissents(self, edge: object) -> int:
        """Tasks on which a dispute found ``edge`` outside a strict majority."""
        return int(await self._call(self._contract.functions.dissents(as_address(edge, "edge"))))

    async def dispute_info(self, dispute_id: int) -> DisputeInfo:
        """A recorded dispute (all zero when unknown)."""
        fn = self._contract.functions.getDispute(as_uint(dispute_id, "dispute_id", 256))
        task_id, input_key, majority, reporter, edges, dissenters = await self._call(fn)
        return DisputeInfo(
            bytes(task_id), bytes(input_key), bytes(majority), reporter, edges, dissenters
        )
