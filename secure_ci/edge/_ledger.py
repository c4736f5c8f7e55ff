"""The edge on the shared ledger: registration, the chain's device registry, anchoring.

``async with open_edge_ledger(config, identity, operator_key, journal=journal) as ledger``
returns at once: the edge serves while a background supervisor connects to
``config.ledger.rpc``, registers the enclave key (measurement, quote id, endpoint) for the
operator's party when the chain lacks that registration, tops the enclave key up so it can
pay for its anchoring transactions, loads the device registry from the deployment block, and
anchors the journal. Inside the block, ``ledger.edge_config`` (the EIP-712 domain of the
deployment) and ``ledger.devices`` (the registry) are what the edge serves with.

The chain may go away and come back. The journal is the source of truth and the chain the
witness, so the supervisor never ends the edge because of the chain: on any chain failure it
logs what happened, keeps the last known registry, and reconnects with back-off. A chain that
lost its state (a dev chain restarted, the contract redeployed at the same address and the
parties onboarded again) gets the edge registered again and every batch it lacks anchored in
a new epoch (see ``secure_ci.ledger._anchor``). Leaving the block flushes the journal onto the
chain, with a bounded number of attempts; what is left stays in the journal for the next start.

The edge checks ``device in ledger.devices`` for every Hello, synchronously, against a cache:
a device registered a moment ago is refused until the next refresh, and a revoked one is
refused from the next refresh on (its open sessions run to their end).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Container, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from eth_account import Account
from eth_account.signers.local import LocalAccount

from secure_ci.edge._challenges import ChallengeResponder
from secure_ci.edge._config import EdgeConfig, LedgerSettings, format_address
from secure_ci.edge._identity import EnclaveIdentity
from secure_ci.edge._state import SealedStore
from secure_ci.exceptions import ConfigError, LedgerError, SecureCIError
from secure_ci.ledger._anchor import Anchorer
from secure_ci.ledger._client import LedgerClient
from secure_ci.ledger._connect import open_ledger
from secure_ci.ledger._epoch import EpochStore, MemoryEpochStore, SealedEpochStore
from secure_ci.ledger._hints import explain
from secure_ci.ledger._journal import Journal
from secure_ci.ledger._registry import LOG_CHUNK_BLOCKS

__all__ = ["DeviceLog", "EdgeLedger", "RegisteredDevices", "open_edge_ledger"]

log = logging.getLogger(__name__)

RETRY_SECONDS = (0.5, 10.0)
"""First and longest wait before the ledger is tried again after a failure."""
SHUTDOWN_ATTEMPTS = 3
"""Anchoring attempts after the edge stopped; what is left stays in the journal."""


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
    them from ``first_block``, in chunks of :data:`LOG_CHUNK_BLOCKS`); :meth:`reload` reads a
    (maybe new) chain from scratch and swaps the result in at once. ``in`` never waits for the
    chain (see the module docstring for what that means for fresh registrations).
    """

    def __init__(self, source: DeviceLog | None = None, first_block: int = 0) -> None:
        self._source = source
        self._active: frozenset[bytes] = frozenset()
        self._next_block = first_block

    def __contains__(self, device: object) -> bool:
        return device in self._active

    def __len__(self) -> int:
        return len(self._active)

    async def _read(self, active: set[bytes], first: int) -> tuple[int, int]:
        if self._source is None:
            raise LedgerError("the device registry has no chain to read")
        latest = await self._source.block_number()
        applied = 0
        while first <= latest:
            last = min(first + LOG_CHUNK_BLOCKS - 1, latest)
            for device, registered in await self._source.device_events(first, last):
                if registered:
                    active.add(device)
                else:
                    active.discard(device)
                applied += 1
            first = last + 1
        return applied, latest + 1

    async def refresh(self) -> int:
        """Apply the registry events up to the latest block; the number of events applied."""
        active = set(self._active)
        applied, self._next_block = await self._read(active, self._next_block)
        self._active = frozenset(active)  # one atomic swap
        return applied

    async def reload(self, source: DeviceLog, first_block: int) -> int:
        """Read ``source`` from ``first_block`` afresh; the old set serves until it is done."""
        self._source = source
        active: set[bytes] = set()
        applied, self._next_block = await self._read(active, first_block)
        self._active = frozenset(active)
        return applied


def _endpoint(config: EdgeConfig, settings: LedgerSettings) -> str:
    if settings.endpoint is not None:
        return settings.endpoint
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"{host}:{config.port}"


def _first_error(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


@dataclass
class EdgeLedger:
    """A registered edge on the ledger (use :func:`open_edge_ledger`)."""

    settings: LedgerSettings
    edge_config: EdgeConfig
    """The configuration to serve with: its EIP-712 domain is the deployment's."""
    identity: EnclaveIdentity
    operator: LocalAccount
    journal: Journal
    devices: RegisteredDevices
    endpoint: str
    models: tuple[bytes, ...] = ()
    """Model ids the edge serves: each must be registered on the ledger before it serves."""
    client: LedgerClient | None = None
    """The chain while connected (None while the supervisor waits to reconnect)."""
    anchorer: Anchorer | None = None
    funded_wei: int = 0
    """What the operator sent the enclave key (0 when it already had enough)."""
    registrations: int = 0
    """Registration transactions sent (a restart of a registered edge sends none)."""
    connects: int = 0
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    epoch_store: EpochStore = field(default_factory=MemoryEpochStore)
    """The anchorer's epoch state: sealed with the keys, so the host cannot choose it."""

    supervisor: asyncio.Task[None] | None = None
    """The background task; it ends early only on a configuration error (it raises it)."""

    @property
    def chain_id(self) -> int:
        return self.edge_config.chain_id

    @property
    def contract(self) -> str:
        return format_address(self.edge_config.contract)

    async def _register(self, client: LedgerClient) -> None:
        """Register the enclave key unless the chain already has exactly this registration."""
        ident, settings = self.identity, self.settings
        if not await client.is_allowed_measurement(ident.measurement):
            raise LedgerError(
                f"measurement {ident.measurement.hex()} is not a valid release on the ledger "
                f"(a party proposes it: secure-ci ledger measurement allow "
                f"{ident.measurement.hex()}; it is valid once approved by the threshold)"
            )
        now = await client.registered_edge(ident.address)
        if now is not None and (
            now.party_id, now.measurement, now.quote_id, now.endpoint
        ) == (settings.party_id, ident.measurement, ident.quote_id, self.endpoint):  # fmt: skip
            if not now.active:
                raise LedgerError(
                    f"edge {ident.address_text} is revoked on the ledger: it keeps journalling, "
                    "but cannot anchor until its party registers it again"
                )
            return
        await client.register_edge(
            self.operator, settings.party_id, Account.from_key(ident.signing_key),
            ident.measurement, ident.quote_id, self.endpoint,
        )  # fmt: skip
        self.registrations += 1
        log.info(
            "registered edge %s for party %d at %s (measurement %s)",
            ident.address_text, settings.party_id, self.endpoint, ident.measurement.hex()[:16],
        )  # fmt: skip

    async def _refresh_loop(self, stop: asyncio.Event, responder: ChallengeResponder) -> None:
        """Follow the device registry and answer challenges (a failure ends this connection:
        the supervisor reconnects)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.refresh_seconds)
            if not stop.is_set():
                await self.devices.refresh()
                await responder.poll()

    async def _connection(self, stop: asyncio.Event) -> None:
        """One connection to the chain: register, load the registry, anchor until ``stop``."""
        settings = self.settings
        async with open_ledger(str(settings.rpc), contract_address=self.contract) as client:
            if client.chain_id != self.chain_id:
                raise ConfigError(
                    f"the node at {settings.rpc} runs chain {client.chain_id}, the deployment "
                    f"is on chain {self.chain_id}"
                )
            await self._register(client)
            for model_id in self.models:
                if not await client.model_party(model_id):
                    raise LedgerError(
                        f"model {model_id.hex()} is not registered on the ledger (its party's "
                        "admin runs `secure-ci ledger model register PACKAGE`)"
                    )
            self.funded_wei = await client.top_up(
                self.operator, self.identity.address_text, settings.fund_wei
            )
            count = await self.devices.reload(client, settings.deployment_block)
            self.anchorer = Anchorer(
                self.journal, client, Account.from_key(self.identity.signing_key),
                max_records=settings.batch_records, max_seconds=settings.batch_seconds,
                epoch_state=self.epoch_store,
            )  # fmt: skip
            lost = await self.anchorer.sync()
            self.client = client
            self.connects += 1
            self.connected.set()
            log.info(
                "ledger %s on chain %d: %d devices registered (%d registry events), "
                "%d journal records to anchor%s",
                self.contract, self.chain_id, len(self.devices), count, self._unanchored(),
                f", the chain lost {lost} batches: new epoch" if lost else "",
            )  # fmt: skip
            try:
                responder = ChallengeResponder(
                    client, self.journal, Account.from_key(self.identity.signing_key),
                    settings.deployment_block,
                )  # fmt: skip
                async with asyncio.TaskGroup() as group:
                    group.create_task(self.anchorer.run(stop=stop))
                    group.create_task(self._refresh_loop(stop, responder))
            finally:
                self.client = None
                self.connected.clear()

    def _unanchored(self) -> int:
        return self.journal.unanchored_records

    async def _supervise(self, stop: asyncio.Event) -> None:
        """Connect, and reconnect after any chain failure, until ``stop`` and a final flush."""
        delay, attempts_after_stop = RETRY_SECONDS[0], 0
        while True:
            connects = self.connects
            try:
                await self._connection(stop)
                return
            except ConfigError:
                raise
            except (SecureCIError, BaseExceptionGroup) as exc:
                error = _first_error(exc)
                if isinstance(error, ConfigError):
                    raise error from None
                if not isinstance(error, SecureCIError):
                    raise
                if self.connects > connects:  # it was connected: back-off starts afresh
                    delay = RETRY_SECONDS[0]
                if stop.is_set():
                    attempts_after_stop += 1
                    if attempts_after_stop >= SHUTDOWN_ATTEMPTS:
                        log.warning(
                            "stopping with %d records not anchored (%s): they stay in the "
                            "journal and are anchored when the edge next runs",
                            self._unanchored(), explain(error),
                        )  # fmt: skip
                        return
                log.warning("ledger: %s (serving on; retry in %.1fs)", explain(error), delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(2 * delay, RETRY_SECONDS[1])

    async def wait_connected(self) -> None:
        """Wait until the supervisor is connected (registered, registry loaded)."""
        await self.connected.wait()


@contextlib.asynccontextmanager
async def open_edge_ledger(
    config: EdgeConfig,
    identity: EnclaveIdentity,
    operator_key: bytes,
    *,
    journal: Journal,
    models: Iterable[bytes] = (),
    sealed: SealedStore | None = None,
) -> AsyncIterator[EdgeLedger]:
    """Serve on the ledger of ``config.ledger`` (see the module docstring).

    ``operator_key`` is the private key of the admin of ``config.ledger.party_id`` (it pays
    for the registration and the enclave key's funding). Raises ConfigError when ``config``
    has no ``[ledger]``, the key is not a key, or the node's chain id is not the deployment's.
    Without a chain id in the settings, the chain must be reachable at start to learn it.
    ``sealed`` (the store of the edge's keys) keeps the anchoring epoch state (see
    ``secure_ci.ledger._epoch``); without it the state lives in memory until the block ends.
    """
    settings = config.ledger
    if settings is None:
        raise ConfigError("the edge configuration has no [ledger] table")
    contract = settings.contract
    if settings.rpc is None or contract is None:
        raise ConfigError("[ledger] names a deployment file that was not read")
    try:
        operator: LocalAccount = Account.from_key(operator_key)
    except (ValueError, TypeError) as exc:
        raise ConfigError("the operator key is not a valid secp256k1 private key") from exc
    chain_id = settings.chain_id
    if chain_id is None:
        async with open_ledger(settings.rpc, contract_address=format_address(contract)) as client:
            chain_id = client.chain_id
        settings = dataclasses.replace(settings, chain_id=chain_id)
    if config.chain_id not in (0, chain_id):
        raise ConfigError(f"chain_id {config.chain_id} is not the chain's {chain_id}")
    ledger = EdgeLedger(
        settings=settings,
        edge_config=dataclasses.replace(
            config, chain_id=chain_id, contract=contract, ledger=settings
        ),
        identity=identity,
        operator=operator,
        journal=journal,
        devices=RegisteredDevices(first_block=settings.deployment_block),
        endpoint=_endpoint(config, settings),
        models=tuple(sorted(set(models))),
        epoch_store=MemoryEpochStore() if sealed is None else SealedEpochStore(sealed),
    )
    stop = asyncio.Event()
    ledger.supervisor = supervisor = asyncio.create_task(ledger._supervise(stop))
    try:
        yield ledger
    finally:
        stop.set()
        await supervisor  # bounded: SHUTDOWN_ATTEMPTS once stopped
