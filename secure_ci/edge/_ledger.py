"""The edge on the shared ledger: registration, the chain's device registry, anchoring.

``async with open_edge_ledger(config, identity, operator_key, journal=journal) as ledger``
connects to ``config.ledger.rpc``, registers the edge's enclave key (measurement, quote id,
endpoint) for the operator's party, tops the enclave key up so it can pay for its anchoring
transactions, and loads the device registry. Inside the block, ``ledger.edge_config`` (the
EIP-712 domain read from the chain) and ``ledger.devices`` (the registry) are what the edge
serves with; in the background the registry is re-read every ``refresh_seconds`` and the
journal is anchored. Leaving the block flushes the journal onto the chain.

The edge checks ``device in ledger.devices`` for every Hello, synchronously, against a cache:
a device registered a moment ago is refused until the next refresh, and a revoked one is
refused from the next refresh on (its open sessions run to their end).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Container
from dataclasses import dataclass
from typing import Any, Protocol

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import HexStr
from web3 import AsyncWeb3

from secure_ci.edge._config import EdgeConfig, LedgerSettings, format_address
from secure_ci.edge._identity import EnclaveIdentity
from secure_ci.exceptions import ChainError, ConfigError, LedgerError
from secure_ci.ledger._anchor import Anchorer
from secure_ci.ledger._artifacts import ContractArtifact, load_artifact
from secure_ci.ledger._backends import make_provider, translate_errors
from secure_ci.ledger._chain import as_address
from secure_ci.ledger._client import LedgerClient
from secure_ci.ledger._connect import open_ledger
from secure_ci.ledger._journal import Journal

__all__ = ["DeviceLog", "EdgeLedger", "RegisteredDevices", "open_edge_ledger"]

log = logging.getLogger(__name__)

LOG_CHUNK_BLOCKS = 10_000
"""Blocks per ``eth_getLogs`` query when the registry is read (nodes cap log ranges)."""
RETRY_SECONDS = (0.5, 30.0)
"""First and longest wait before anchoring is retried after a chain (transport) failure."""
SHUTDOWN_ATTEMPTS = 3
"""Anchoring attempts after the edge stopped; what is left stays in the journal."""
_TIMEOUT = 60.0


class DeviceLog(Protocol):
    """Where registry changes come from: the contract's device events, in chain order."""

    async def block_number(self) -> int: ...

    async def device_events(self, first: int, last: int) -> list[tuple[bytes, bool]]:
        """``(device, registered)`` for every DeviceRegistered/DeviceRevoked in blocks
        ``first..last``, in the order the chain applied them."""
        ...


class RegisteredDevices(Container[bytes]):
    """The chain's active devices, as a cache the edge checks synchronously.

    :meth:`refresh` applies the registry events since the last refresh (the first one reads
    them from block 0, in chunks of :data:`LOG_CHUNK_BLOCKS`); ``in`` never waits for the
    chain (see the module docstring for what that means for fresh registrations).
    """

    def __init__(self, source: DeviceLog) -> None:
        self._source = source
        self._active: frozenset[bytes] = frozenset()
        self._next_block = 0

    def __contains__(self, device: object) -> bool:
        return device in self._active

    def __len__(self) -> int:
        return len(self._active)

    async def refresh(self) -> int:
        """Apply the registry events up to the latest block; the number of events applied."""
        latest = await self._source.block_number()
        active, applied = set(self._active), 0
        first = self._next_block
        while first <= latest:
            last = min(first + LOG_CHUNK_BLOCKS - 1, latest)
            for device, registered in await self._source.device_events(first, last):
                if registered:
                    active.add(device)
                else:
                    active.discard(device)
                applied += 1
            first = last + 1
        self._active, self._next_block = frozenset(active), latest + 1  # one atomic swap
        return applied


class _ChainDeviceLog:
    """DeviceLog over the contract's events on a JSON-RPC node."""

    def __init__(self, w3: AsyncWeb3[Any], artifact: ContractArtifact, address: str) -> None:
        self._w3 = w3
        self._artifact = artifact
        self._contract = w3.eth.contract(address=as_address(address), abi=list(artifact.abi))

    async def block_number(self) -> int:
        with translate_errors(self._artifact):
            return int(await self._w3.eth.block_number)

    async def device_events(self, first: int, last: int) -> list[tuple[bytes, bool]]:
        events = self._contract.events
        with translate_errors(self._artifact):
            added = await events.DeviceRegistered.get_logs(from_block=first, to_block=last)
            removed = await events.DeviceRevoked.get_logs(from_block=first, to_block=last)
        tagged = [(e, True) for e in added] + [(e, False) for e in removed]
        tagged.sort(key=lambda t: (int(t[0]["blockNumber"]), int(t[0]["logIndex"])))
        return [(bytes.fromhex(str(e["args"]["device"])[2:]), on) for e, on in tagged]


def _endpoint(config: EdgeConfig, settings: LedgerSettings) -> str:
    if settings.endpoint is not None:
        return settings.endpoint
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"{host}:{config.port}"


async def _top_up(w3: AsyncWeb3[Any], payer: LocalAccount, to: str, wei: int) -> int:
    """Send ``to`` what it lacks of ``wei`` (from ``payer``); the amount sent."""
    balance = int(await w3.eth.get_balance(as_address(to)))
    if balance >= wei:
        return 0
    amount = wei - balance
    signed = payer.sign_transaction(
        {
            "to": HexStr(as_address(to)),
            "value": amount,
            "nonce": await w3.eth.get_transaction_count(payer.address, "pending"),
            "gas": 21_000,
            "gasPrice": await w3.eth.gas_price,
            "chainId": await w3.eth.chain_id,
        }
    )
    tx_hash = await w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = await w3.eth.wait_for_transaction_receipt(
        tx_hash, timeout=_TIMEOUT, poll_latency=0.02
    )
    if receipt["status"] != 1:
        raise ChainError(f"funding the enclave key {to} failed")
    return amount


@dataclass
class EdgeLedger:
    """A registered edge on the ledger (use :func:`open_edge_ledger`)."""

    client: LedgerClient
    settings: LedgerSettings
    edge_config: EdgeConfig
    """The configuration to serve with: its EIP-712 domain is the chain's."""
    devices: RegisteredDevices
    anchorer: Anchorer
    endpoint: str
    funded_wei: int
    """What the operator sent the enclave key at start (0 when it already had enough)."""

    @property
    def chain_id(self) -> int:
        return self.client.chain_id

    @property
    def contract(self) -> str:
        return self.client.address

    async def _refresh_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.refresh_seconds)
            if stop.is_set():
                return
            try:
                await self.devices.refresh()
            except ChainError as exc:  # keep serving the last known registry
                log.warning("device registry refresh failed: %s", exc)

    async def _anchor_loop(self, stop: asyncio.Event) -> None:
        """Anchor until ``stop``; retry chain (transport) failures, bounded after stop."""
        delay, failures = RETRY_SECONDS[0], 0
        while True:
            try:
                await self.anchorer.run(stop=stop)
                return
            except ChainError as exc:
                failures += 1
                if stop.is_set() and failures >= SHUTDOWN_ATTEMPTS:
                    raise
                log.warning("anchoring failed (retry in %.1fs): %s", delay, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(2 * delay, RETRY_SECONDS[1])


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    return group.exceptions[0] if len(group.exceptions) == 1 else group


@contextlib.asynccontextmanager
async def open_edge_ledger(
    config: EdgeConfig,
    identity: EnclaveIdentity,
    operator_key: bytes,
    *,
    journal: Journal,
) -> AsyncIterator[EdgeLedger]:
    """Register the edge, load the registry and anchor ``journal`` until the block ends.

    ``operator_key`` is the private key of the admin of ``config.ledger.party_id`` (it pays
    for the registration and the enclave key's funding). Raises LedgerError when the ledger's
    owner has not allowed the enclave's measurement (its batches would revert), ConfigError
    when ``config`` has no ``[ledger]`` or its chain id disagrees with the chain.
    """
    settings = config.ledger
    if settings is None:
        raise ConfigError("the edge configuration has no [ledger] table")
    try:
        operator: LocalAccount = Account.from_key(operator_key)
    except (ValueError, TypeError) as exc:
        raise ConfigError("the operator key is not a valid secp256k1 private key") from exc
    enclave: LocalAccount = Account.from_key(identity.signing_key)
    contract = format_address(settings.contract)
    artifact = load_artifact()
    w3 = AsyncWeb3(make_provider(settings.rpc))
    try:
        async with open_ledger(settings.rpc, contract_address=contract) as client:
            if config.chain_id not in (0, client.chain_id):
                raise ConfigError(
                    f"chain_id {config.chain_id} is not the chain's {client.chain_id}"
                )
            if not await client.is_allowed_measurement(identity.measurement):
                raise LedgerError(
                    f"measurement {identity.measurement.hex()} is not allowed on the ledger"
                )
            endpoint = _endpoint(config, settings)
            await client.register_edge(
                operator, settings.party_id, enclave, identity.measurement,
                identity.quote_id, endpoint,
            )  # fmt: skip
            with translate_errors(artifact):
                funded = await _top_up(w3, operator, enclave.address, settings.fund_wei)
            devices = RegisteredDevices(_ChainDeviceLog(w3, artifact, client.address))
            await devices.refresh()
            ledger = EdgeLedger(
                client=client,
                settings=settings,
                edge_config=dataclasses.replace(
                    config, chain_id=client.chain_id, contract=settings.contract
                ),
                devices=devices,
                anchorer=Anchorer(
                    journal,
                    client,
                    enclave,
                    max_records=settings.batch_records,
                    max_seconds=settings.batch_seconds,
                ),
                endpoint=endpoint,
                funded_wei=funded,
            )
            stop = asyncio.Event()
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(ledger._anchor_loop(stop))
                    group.create_task(ledger._refresh_loop(stop))
                    try:
                        yield ledger
                    finally:
                        stop.set()
            except BaseExceptionGroup as group_error:  # one failure: raise it as itself
                error = _unwrap(group_error)
                if error is group_error:
                    raise
                raise error from error.__cause__
    finally:
        with contextlib.suppress(Exception):
            await w3.provider.disconnect()
