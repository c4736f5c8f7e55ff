"""What an auditor reads from the chain besides batches: registry history, block times and
challenges.

A record's findings depend on the registry *as it was when its batch was anchored* (was the
device registered, which quote id had the edge registered) and on when that was (the block's
timestamp against the request's deadline). The registry's current state says neither, so the
auditor reads the registry's events (DeviceRegistered, DeviceRevoked, EdgeRegistered) with
their positions and replays them up to each batch's block. Challenges (ChallengeOpened,
RequestChallengeOpened, RequestRefused) hold what the edge's enclave signed outside its
batches; equivocation findings compare anchored records with them (``_audit_claims``).

:class:`RegistryHistory` is the interface; :class:`ChainHistory` implements it over a
``LedgerClient`` (any JSON-RPC node or the in-process chain). Event reads go in chunks of
``LOG_CHUNK_BLOCKS`` because nodes cap the block range of ``eth_getLogs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from eth_abi.abi import decode as abi_decode
from eth_abi.exceptions import DecodingError

from secure_ci.exceptions import ChainError, RecordError
from secure_ci.ledger._records import LedgerDomain, TaskResult, keccak256
from secure_ci.ledger._registry import LOG_CHUNK_BLOCKS
from secure_ci.ledger._session import ContractSession

__all__ = [
    "DEVICE",
    "EDGE",
    "REFUSAL",
    "REQUEST_CHALLENGE",
    "RESULT_CHALLENGE",
    "ChainHistory",
    "ChallengeEvent",
    "ChallengeHistory",
    "RegistryEvent",
    "RegistryHistory",
    "challenge_event",
    "challenge_history",
    "challenged_request",
    "registry_event",
    "registry_history",
]

DEVICE, EDGE = 0, 1
"""``RegistryEvent.kind``: a device key's registration, an edge key's registration."""

_EVENTS = {  # event name -> (kind, the argument naming the key)
    "DeviceRegistered": (DEVICE, "device"),
    "DeviceRevoked": (DEVICE, "device"),
    "EdgeRegistered": (EDGE, "edge"),
}


@dataclass(frozen=True, slots=True)
class RegistryEvent:
    """One registry change at (``block``, ``log_index``).

    For a device ``value`` is ``b"\\x01"`` (registered) or ``b""`` (revoked); for an edge it
    is the quote id it registered (32 bytes).
    """

    block: int
    log_index: int
    kind: int
    key: bytes
    value: bytes


RESULT_CHALLENGE, REQUEST_CHALLENGE, REFUSAL = 0, 1, 2
"""``ChallengeEvent.kind``: ChallengeOpened, RequestChallengeOpened, RequestRefused."""

_CHALLENGE_EVENTS = {
    "ChallengeOpened": RESULT_CHALLENGE,
    "RequestChallengeOpened": REQUEST_CHALLENGE,
    "RequestRefused": REFUSAL,
}


@dataclass(frozen=True, slots=True)
class ChallengeEvent:
    """One enclave-signed statement the chain holds from a challenge.

    ``RESULT_CHALLENGE``: the edge's enclave signed the result with record hash ``value`` for
    edge sequence number ``seq`` (the contract checked the signature before it emitted the
    event); ``request_hash`` is that result's ``requestHash`` when the challenge was a direct
    call whose calldata holds it (else empty). ``REQUEST_CHALLENGE``: a device challenged the
    edge with its signed request of
    struct hash ``value`` (no statement of the edge yet). ``REFUSAL``: the enclave signed a
    refusal (``reason``) of the request of challenge ``challenge_id``; ``value`` is empty.
    """

    block: int
    log_index: int
    kind: int
    challenge_id: int
    edge: bytes
    value: bytes
    seq: int = 0
    task_id: bytes = bytes(32)
    reason: int = 0
    request_hash: bytes = b""


@runtime_checkable
class ChallengeHistory(Protocol):
    """The chain's challenge events (what equivocation findings compare records with)."""

    async def block_number(self) -> int: ...
    async def challenge_events(self, first: int, last: int) -> list[ChallengeEvent]: ...


@runtime_checkable
class RegistryHistory(Protocol):
    """The chain reads findings need beyond the batches themselves."""

    async def block_number(self) -> int: ...
    async def block_timestamp(self, block: int) -> int: ...
    async def registry_events(self, first: int, last: int) -> list[RegistryEvent]: ...


def _address(value: object) -> bytes:
    if isinstance(value, bytes | bytearray) and len(value) == 20:
        return bytes(value)
    if isinstance(value, str) and value.startswith("0x") and len(value) == 42:
        try:
            return bytes.fromhex(value[2:])
        except ValueError:
            pass
    raise ChainError(f"malformed address in a registry log: {value!r}")


def _uint(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ChainError(f"malformed {what} in a registry log: {value!r}")
    return value


def registry_event(name: str, log: Mapping[str, Any]) -> RegistryEvent:
    """The :class:`RegistryEvent` of one decoded log (ChainError if it is malformed)."""
    if name not in _EVENTS:
        raise ChainError(f"not a registry event: {name!r}")
    kind, key_arg = _EVENTS[name]
    args = log.get("args")
    if not isinstance(args, Mapping) or key_arg not in args:
        raise ChainError(f"{name} log without its {key_arg!r} argument")
    block = _uint(log.get("blockNumber"), "block number")
    index = _uint(log.get("logIndex"), "log index")
    key = _address(args[key_arg])
    if kind == DEVICE:
        value = b"\x01" if name == "DeviceRegistered" else b""
    else:
        quote_id = args.get("quoteId")
        if not isinstance(quote_id, bytes | bytearray) or len(quote_id) != 32:
            raise ChainError(f"EdgeRegistered log with a malformed quote id: {quote_id!r}")
        value = bytes(quote_id)
    return RegistryEvent(block, index, kind, key, value)


def _bytes32(value: object, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise ChainError(f"malformed {what} in a challenge log: {value!r}")
    return bytes(value)


def challenge_event(name: str, log: Mapping[str, Any]) -> ChallengeEvent:
    """The :class:`ChallengeEvent` of one decoded log (ChainError if it is malformed)."""
    if name not in _CHALLENGE_EVENTS:
        raise ChainError(f"not a challenge event: {name!r}")
    kind = _CHALLENGE_EVENTS[name]
    args = log.get("args")
    if not isinstance(args, Mapping) or "challengeId" not in args or "edge" not in args:
        raise ChainError(f"{name} log without its challenge id or edge")
    block = _uint(log.get("blockNumber"), "block number")
    index = _uint(log.get("logIndex"), "log index")
    challenge_id = _uint(args["challengeId"], "challenge id")
    edge = _address(args["edge"])
    if kind == RESULT_CHALLENGE:
        return ChallengeEvent(
            block, index, kind, challenge_id, edge, _bytes32(args.get("recordHash"), "record hash"),
            seq=_uint(args.get("seq"), "sequence number"),
            task_id=_bytes32(args.get("taskId"), "task id"),
        )  # fmt: skip
    if kind == REQUEST_CHALLENGE:
        return ChallengeEvent(
            block, index, kind, challenge_id, edge,
            _bytes32(args.get("requestHash"), "request hash"),
            task_id=_bytes32(args.get("taskId"), "task id"),
        )  # fmt: skip
    return ChallengeEvent(
        block, index, kind, challenge_id, edge, b"", reason=_uint(args.get("reason"), "reason")
    )


class ChainHistory:
    """:class:`RegistryHistory` over a bound SecureCILedger contract."""

    def __init__(self, ledger: ContractSession) -> None:
        # the session's own web3 binding: the same node, contract and error translation
        self._ledger = ledger
        self._contract = ledger._contract
        self._w3 = ledger._w3

    async def block_number(self) -> int:
        return await self._ledger.block_number()

    async def block_timestamp(self, block: int) -> int:
        with self._ledger._errors():
            found = await self._w3.eth.get_block(block)
        return _uint(found.get("timestamp"), "block timestamp")

    async def registry_events(self, first: int, last: int) -> list[RegistryEvent]:
        """Every registry event in blocks ``first..last``, in the order the chain applied them."""
        out: list[RegistryEvent] = []
        for start in range(first, last + 1, LOG_CHUNK_BLOCKS):
            stop = min(last, start + LOG_CHUNK_BLOCKS - 1)
            for name in _EVENTS:
                event = getattr(self._contract.events, name)
                with self._ledger._errors():
                    logs = await event.get_logs(from_block=start, to_block=stop)
                out.extend(registry_event(name, log) for log in logs)
        out.sort(key=lambda e: (e.block, e.log_index))
        return out

    async def challenge_events(self, first: int, last: int) -> list[ChallengeEvent]:
        """Every challenge event in blocks ``first..last``, in chain order; a result
        challenge made by a direct call carries its result's request hash."""
        out: list[ChallengeEvent] = []
        for start in range(first, last + 1, LOG_CHUNK_BLOCKS):
            stop = min(last, start + LOG_CHUNK_BLOCKS - 1)
            for name in _CHALLENGE_EVENTS:
                event = getattr(self._contract.events, name)
                with self._ledger._errors():
                    logs = await event.get_logs(from_block=start, to_block=stop)
                for log in logs:
                    found = challenge_event(name, log)
                    if found.kind == RESULT_CHALLENGE:
                        found = replace(found, request_hash=await self._request_of(log, found))
                    out.append(found)
        out.sort(key=lambda e: (e.block, e.log_index))
        return out

    async def _request_of(self, log: Mapping[str, Any], event: ChallengeEvent) -> bytes:
        """The challenged result's request hash from the challenge transaction's calldata,
        empty when it was not a direct ``challenge`` call or does not hash to the log's
        record hash."""
        with self._ledger._errors():
            tx = await self._w3.eth.get_transaction(log["transactionHash"])
        return challenged_request(
            tx.get("to"), bytes(tx.get("input") or b""), self._ledger.domain, event.value
        )


_CHALLENGE_SELECTOR = keccak256(
    b"challenge((bytes32,bytes32,bytes32,bytes32,bytes32,uint8,uint32,uint64),bytes)"
)[:4]


def challenged_request(to: object, data: bytes, domain: LedgerDomain, record_hash: bytes) -> bytes:
    """The ``requestHash`` of the TaskResult a ``challenge`` call's calldata carries, or b""
    when the transaction is not a direct call of the ledger's ``challenge`` or its result does
    not hash to ``record_hash`` (what the log says the enclave signed)."""
    if str(to or "").lower() != "0x" + domain.contract.hex() or data[:4] != _CHALLENGE_SELECTOR:
        return b""
    try:
        fields, _sig = abi_decode(
            ["(bytes32,bytes32,bytes32,bytes32,bytes32,uint8,uint32,uint64)", "bytes"], data[4:]
        )
        result = TaskResult(*fields)
    except (DecodingError, RecordError, ValueError, TypeError):
        return b""
    return result.request_hash if result.digest(domain) == record_hash else b""


def challenge_history(ledger: object) -> ChallengeHistory | None:
    """The challenge history of ``ledger`` (as :func:`registry_history`), else None."""
    if isinstance(ledger, ChallengeHistory):
        return ledger
    if isinstance(ledger, ContractSession):
        return ChainHistory(ledger)
    return None


def registry_history(ledger: object) -> RegistryHistory | None:
    """The registry history of ``ledger``: its own if it has one, read from the contract of a
    ``LedgerClient``, else None (an in-memory fake without history)."""
    if isinstance(ledger, RegistryHistory):
        return ledger
    if isinstance(ledger, ContractSession):
        return ChainHistory(ledger)
    return None
