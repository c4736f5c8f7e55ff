"""Governance calls: k-of-n proposals for parties and releases, suspensions, release reads.

The contract (``ledger/contracts/Governance.sol``) numbers parties from 1 (the deployer's),
gives each admin key one vote, and identifies a proposal by the keccak256 of its action
(:func:`proposal_id` computes it the same way). A proposer's own approval counts; anyone may
execute a proposal with ``threshold`` approvals. A new release is valid from the later of its
``not_before`` and the notice period after execution, until ``not_after``; any one party
suspends it at once, lifting a suspension is a proposal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi.abi import encode as abi_encode
from eth_account.signers.local import LocalAccount

from secure_ci.exceptions import LedgerError, RecordError
from secure_ci.ledger._chain import as_address, as_bytes32, as_uint
from secure_ci.ledger._records import keccak256
from secure_ci.ledger._registry import LOG_CHUNK_BLOCKS
from secure_ci.ledger._session import ContractSession

__all__ = [
    "MAX_SOURCES",
    "OP_ADD_PARTY",
    "OP_ADD_RELEASE",
    "OP_LIFT_SUSPENSION",
    "RELEASE_KINDS",
    "RELEASE_MEASUREMENT",
    "RELEASE_MODEL",
    "GovernanceCalls",
    "GovernanceTx",
    "ProposalInfo",
    "ReleaseInfo",
    "proposal_id",
]

RELEASE_MEASUREMENT = 0
RELEASE_MODEL = 1
RELEASE_KINDS = {"measurement": RELEASE_MEASUREMENT, "model": RELEASE_MODEL}
OP_ADD_PARTY = 1
OP_ADD_RELEASE = 2
OP_LIFT_SUSPENSION = 3
OP_NAMES = {OP_ADD_PARTY: "add-party", OP_ADD_RELEASE: "add-release", OP_LIFT_SUSPENSION: "lift"}
MAX_SOURCES = 16
_PENDING, _EXECUTED = 1, 2
_ZERO_ADDRESS = "0x" + "00" * 20
_GAS_MARGIN = 0.2  # a release's notice and validity depend on the mining block's timestamp


def proposal_id(
    op: int,
    kind: int = 0,
    digest: bytes = bytes(32),
    party_id: int = 0,
    admin: object = _ZERO_ADDRESS,
    not_before: int = 0,
    not_after: int = 0,
    sources: Sequence[bytes] = (),
    nonce: int = 0,
) -> bytes:
    """keccak256 of the action, as the contract's ``proposalId`` computes it."""
    sources_hash = keccak256(b"".join(as_bytes32(s, "source") for s in sources))
    return keccak256(
        abi_encode(
            [
                "uint8",
                "uint8",
                "bytes32",
                "uint64",
                "address",
                "uint64",
                "uint64",
                "bytes32",
                "uint32",
            ],
            [
                op,
                kind,
                as_bytes32(digest, "digest"),
                party_id,
                as_address(admin, "admin"),
                not_before,
                not_after,
                sources_hash,
                nonce,
            ],
        )
    )


@dataclass(frozen=True)
class GovernanceTx:
    """A mined governance transaction: the proposal it concerns (zero for a suspension)."""

    proposal_id: bytes
    gas_used: int
    block_number: int


@dataclass(frozen=True)
class ReleaseInfo:
    """A release on chain (``exists`` False and all zero when there is none)."""

    kind: int
    digest: bytes
    party_id: int
    not_before: int
    not_after: int
    suspensions: int
    suspended: bool
    exists: bool
    sources: bytes  # keccak256 of the concatenated source digests

    def valid_at(self, timestamp: int) -> bool:
        """Exists, not suspended and ``not_before <= timestamp < not_after``."""
        return self.exists and not self.suspended and self.not_before <= timestamp < self.not_after

    def state_at(self, timestamp: int) -> str:
        """``valid``, ``suspended``, ``not-yet-valid``, ``expired`` or ``unknown``."""
        if not self.exists:
            return "unknown"
        if self.suspended:
            return "suspended"
        if timestamp < self.not_before:
            return "not-yet-valid"
        return "expired" if timestamp >= self.not_after else "valid"


@dataclass(frozen=True)
class ProposalInfo:
    """A proposal: its action, its approvals and whether it was executed."""

    proposal_id: bytes
    op: int
    kind: int
    executed: bool
    approvals: int
    nonce: int
    party_id: int
    not_before: int
    not_after: int
    proposer: int
    admin: str
    digest: bytes
    sources: tuple[bytes, ...] = ()

    @property
    def action(self) -> str:
        """A one-line description of what executing it does."""
        if self.op == OP_ADD_PARTY:
            return f"add party administered by {self.admin}"
        kind = "model" if self.kind == RELEASE_MODEL else "measurement"
        if self.op == OP_LIFT_SUSPENSION:
            return f"lift suspension {self.nonce} of {kind} {self.digest.hex()}"
        owner = f" of party {self.party_id}" if self.kind == RELEASE_MODEL else ""
        return (
            f"release {kind} {self.digest.hex()}{owner} valid {self.not_before}..{self.not_after}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "proposal": "0x" + self.proposal_id.hex(),
            "op": OP_NAMES.get(self.op, str(self.op)),
            "action": self.action,
            "executed": self.executed,
            "approvals": self.approvals,
            "proposer": self.proposer,
        }


def _kind(kind: int) -> int:
    if kind not in (RELEASE_MEASUREMENT, RELEASE_MODEL):
        raise RecordError(f"release kind {kind!r}: 0 (measurement) or 1 (model)")
    return kind


class GovernanceCalls(ContractSession):
    """Governance transactions and reads over the bound contract (mixed into LedgerClient)."""

    async def _governance_tx(self, account: LocalAccount, fn: Any, proposal: bytes) -> GovernanceTx:
        receipt = await self._transact(account, fn, gas_margin=_GAS_MARGIN)
        return GovernanceTx(proposal, int(receipt["gasUsed"]), int(receipt["blockNumber"]))

    async def _proposed(self, account: LocalAccount, fn: Any) -> GovernanceTx:
        receipt = await self._transact(account, fn)
        pid = bytes(self._event_args("ProposalCreated", receipt)["proposalId"])
        return GovernanceTx(pid, int(receipt["gasUsed"]), int(receipt["blockNumber"]))

    async def propose_party(self, party_admin: LocalAccount, admin: object) -> GovernanceTx:
        """Propose a party administered by ``admin``; ``party_admin`` is an existing party."""
        fn = self._contract.functions.proposeParty(as_address(admin, "admin"))
        return await self._proposed(party_admin, fn)

    async def propose_release(
        self,
        party_admin: LocalAccount,
        kind: int,
        digest: bytes,
        not_before: int,
        not_after: int,
        sources: Sequence[bytes] = (),
        party_id: int = 0,
    ) -> GovernanceTx:
        """Propose a release (a model's names its owning ``party_id``, whose admin sends it)."""
        if len(sources) > MAX_SOURCES:
            raise RecordError(f"a release names at most {MAX_SOURCES} source digests")
        fn = self._contract.functions.proposeRelease(
            _kind(kind), as_bytes32(digest, "digest"), as_uint(party_id, "party_id", 64),
            as_uint(not_before, "not_before", 64), as_uint(not_after, "not_after", 64),
            [as_bytes32(s, "source") for s in sources],
        )  # fmt: skip
        return await self._proposed(party_admin, fn)

    async def propose_lift(
        self, party_admin: LocalAccount, kind: int, digest: bytes
    ) -> GovernanceTx:
        """Propose lifting the release's current suspension."""
        fn = self._contract.functions.proposeLift(_kind(kind), as_bytes32(digest, "digest"))
        return await self._proposed(party_admin, fn)

    async def approve(self, party_admin: LocalAccount, proposal: bytes) -> GovernanceTx:
        """Approve a pending proposal as the party ``party_admin`` administers."""
        pid = as_bytes32(proposal, "proposal id")
        return await self._governance_tx(party_admin, self._contract.functions.approve(pid), pid)

    async def execute(self, sender: LocalAccount, proposal: bytes) -> GovernanceTx:
        """Carry out a proposal that has enough approvals."""
        pid = as_bytes32(proposal, "proposal id")
        return await self._governance_tx(sender, self._contract.functions.execute(pid), pid)

    async def suspend(self, party_admin: LocalAccount, kind: int, digest: bytes) -> GovernanceTx:
        """Suspend a release at once (any one party)."""
        fn = self._contract.functions.suspend(_kind(kind), as_bytes32(digest, "digest"))
        return await self._governance_tx(party_admin, fn, bytes(32))

    async def execute_if_ready(self, sender: LocalAccount, proposed: GovernanceTx) -> bool:
        """Execute ``proposed`` when its approvals already suffice (k = 1); False otherwise."""
        info = await self.proposal(proposed.proposal_id)
        if info.approvals < await self.threshold():
            return False
        await self.execute(sender, proposed.proposal_id)
        return True

    # ------------------------------------------------------------------ reads

    async def threshold(self) -> int:
        """Approvals a proposal needs."""
        return int(await self._call(self._contract.functions.threshold()))

    async def notice_period(self) -> int:
        """Seconds between approving a new release and its becoming valid."""
        return int(await self._call(self._contract.functions.noticePeriod()))

    async def party_of(self, admin: object) -> int:
        """The party ``admin`` administers (0 for none)."""
        return int(await self._call(self._contract.functions.partyOf(as_address(admin, "admin"))))

    async def party_admin(self, party_id: int) -> str:
        """The admin address of a party (the zero address for none)."""
        fn = self._contract.functions.partyAdmin(as_uint(party_id, "party_id", 64))
        return str(await self._call(fn))

    async def release(self, kind: int, digest: bytes) -> ReleaseInfo:
        """The release as the contract stores it."""
        digest = as_bytes32(digest, "digest")
        fn = self._contract.functions.getRelease(_kind(kind), digest)
        party, not_before, not_after, suspensions, suspended, exists, sources = await self._call(fn)
        return ReleaseInfo(
            kind, digest, int(party), int(not_before), int(not_after), int(suspensions),
            bool(suspended), bool(exists), bytes(sources),
        )  # fmt: skip

    async def block_timestamp(self, block: int) -> int:
        """The timestamp of block number ``block``."""
        with self._errors():
            return int((await self._w3.eth.get_block(block))["timestamp"])

    async def release_valid(self, kind: int, digest: bytes) -> bool:
        """The contract's verdict: the release is valid at the latest block."""
        fn = self._contract.functions.releaseValid(_kind(kind), as_bytes32(digest, "digest"))
        return bool(await self._call(fn))

    async def proposal(self, proposal: bytes) -> ProposalInfo:
        """A proposal's state (reverts with UnknownProposal when there is none)."""
        pid = as_bytes32(proposal, "proposal id")
        row = await self._call(self._contract.functions.getProposal(pid))
        op, kind, state, approvals, nonce, party, nb, na, proposer, admin, digest, _ = row
        return ProposalInfo(
            pid, int(op), int(kind), int(state) == _EXECUTED, int(approvals), int(nonce),
            int(party), int(nb), int(na), int(proposer), str(admin), bytes(digest),
        )  # fmt: skip

    async def _logs(self, event: str, first: int, last: int | None = None) -> list[Any]:
        """Every ``event`` log in blocks ``first..last`` (latest by default), in chunks."""
        if last is None:
            last = await self.block_number()
        out: list[Any] = []
        with self._errors():
            while first <= last:
                end = min(first + LOG_CHUNK_BLOCKS - 1, last)
                getter = getattr(self._contract.events, event)
                out.extend(await getter.get_logs(from_block=first, to_block=end))
                first = end + 1
        return out

    async def proposals(
        self, from_block: int = 0, *, pending_only: bool = False
    ) -> list[ProposalInfo]:
        """Every proposal made since ``from_block``, in the order they were made."""
        found = []
        for log in await self._logs("ProposalCreated", from_block):
            args = log["args"]
            info = await self.proposal(bytes(args["proposalId"]))
            if info.executed and pending_only:
                continue
            sources = tuple(bytes(s) for s in args["sources"])
            found.append(dataclasses.replace(info, sources=sources))
        return found

    async def release_events(self, first: int, last: int) -> list[tuple[int, bytes]]:
        """``(kind, digest)`` of every release added, suspended or lifted in ``first..last``."""
        touched: list[tuple[int, int, int, bytes]] = []
        for event in ("ReleaseAdded", "ReleaseSuspended", "SuspensionLifted"):
            for log in await self._logs(event, first, last):
                key = (int(log["blockNumber"]), int(log["logIndex"]))
                touched.append((*key, int(log["args"]["kind"]), bytes(log["args"]["digest"])))
        touched.sort()
        return [(kind, digest) for _, _, kind, digest in touched]

    async def releases(self, from_block: int = 0) -> list[ReleaseInfo]:
        """Every release added since ``from_block``, as stored now (first addition order)."""
        seen: dict[tuple[int, bytes], None] = {}
        for kind, digest in await self.release_events(from_block, await self.block_number()):
            seen.setdefault((kind, digest), None)
        return [await self.release(kind, digest) for kind, digest in seen]

    async def require_executed(self, proposed: GovernanceTx, what: str) -> None:
        """LedgerError naming the proposal when it still waits for approvals."""
        info = await self.proposal(proposed.proposal_id)
        if not info.executed:
            need = await self.threshold()
            raise LedgerError(
                f"{what}: proposal 0x{proposed.proposal_id.hex()} has {info.approvals} of "
                f"{need} approvals; other parties approve it (`secure-ci ledger proposal "
                "approve`), then anyone executes it"
            )
