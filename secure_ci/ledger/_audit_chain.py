"""What an auditor reads from the chain besides batches: registry history and block times.

A record's findings depend on the registry *as it was when its batch was anchored* (was the
device registered, which quote id had the edge registered) and on when that was (the block's
timestamp against the request's deadline). The registry's current state says neither, so the
auditor reads the registry's events (DeviceRegistered, DeviceRevoked, EdgeRegistered) with
their positions and replays them up to each batch's block.

:class:`RegistryHistory` is the interface; :class:`ChainHistory` implements it over a
``LedgerClient`` (any JSON-RPC node or the in-process chain). Event reads go in chunks of
``LOG_CHUNK_BLOCKS`` because nodes cap the block range of ``eth_getLogs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from secure_ci.exceptions import ChainError
from secure_ci.ledger._registry import LOG_CHUNK_BLOCKS
from secure_ci.ledger._session import ContractSession

__all__ = [
    "DEVICE",
    "EDGE",
    "ChainHistory",
    "RegistryEvent",
    "RegistryHistory",
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


def registry_history(ledger: object) -> RegistryHistory | None:
    """The registry history of ``ledger``: its own if it has one, read from the contract of a
    ``LedgerClient``, else None (an in-memory fake without history)."""
    if isinstance(ledger, RegistryHistory):
        return ledger
    if isinstance(ledger, ContractSession):
        return ChainHistory(ledger)
    return None
