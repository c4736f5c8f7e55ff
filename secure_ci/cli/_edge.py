"""`secure-ci edge ...`: Run the enclave-hosted edge service."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import time
from collections.abc import Container
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from secure_ci.cli._common import LogLevel, read_file, set_log_level
from secure_ci.exceptions import ConfigError

if TYPE_CHECKING:
    from secure_ci.attestation import DevPKI, EvidenceProvider
    from secure_ci.edge import EdgeConfig, EnclaveIdentity, ModelRegistry, RecordSink
    from secure_ci.edge._state import SealedStore

app = typer.Typer(help="Run the enclave-hosted edge service.", no_args_is_help=True)
log = logging.getLogger("secure_ci.edge")

_DEV_PKI = "dev-pki.json"
_STOPPED_BY: list[signal.Signals] = []  # the signal that stopped `serve` (SIGINT exits 130)


def _dev_pki(state_dir: Path | None) -> DevPKI:
    """The simulated provider's dev PKI: kept in the state directory, so a restarted edge
    presents the same root and collateral that its devices already trust."""
    from secure_ci.attestation import DevPKI
    from secure_ci.edge._state import write_atomic

    if state_dir is None:
        return DevPKI.generate(int(time.time()))
    path = state_dir / _DEV_PKI
    if path.exists():
        try:
            doc = json.loads(read_file(path, "dev PKI", 4096))
            seed, now = doc["seed"], doc["now"]
            if not (isinstance(seed, int) and isinstance(now, int)):
                raise TypeError("seed and now must be integers")
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} is not a dev PKI record ({exc}): move it away") from exc
        return DevPKI.generate(now, seed=seed)
    seed, now = secrets.randbits(63), int(time.time())
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"seed": seed, "now": now}).encode())
    return DevPKI.generate(now, seed=seed)


def _provider(config: EdgeConfig) -> tuple[EvidenceProvider, DevPKI | None]:
    """The configured provider (``auto``: Gramine when /dev/attestation exists)."""
    from secure_ci.attestation import SimulatedProvider, open_provider
    from secure_ci.attestation._providers import GRAMINE_ATTESTATION_DIR

    kind = config.provider
    if kind == "auto":
        kind = "gramine" if GRAMINE_ATTESTATION_DIR.is_dir() else "simulated"
        log.info(
            "provider auto: %s (%s %s)", kind, GRAMINE_ATTESTATION_DIR,
            "exists" if kind == "gramine" else "does not exist",
        )  # fmt: skip
    if kind == "gramine":
        return open_provider("gramine"), None
    pki = _dev_pki(config.state_dir)
    simulated = SimulatedProvider(pki, mrenclave=config.mrenclave, mrsigner=config.mrsigner)
    log.warning("provider simulated: development quotes, no enclave protects this edge")
    return simulated, pki


def _sealed_store(config: EdgeConfig, provider: EvidenceProvider) -> SealedStore | None:
    from secure_ci.attestation import GramineProvider
    from secure_ci.edge._identity import measurement_of
    from secure_ci.edge._state import DevSealedStore, PlainSealedStore

    if config.sealed_dir is None:
        return None
    if isinstance(provider, GramineProvider):
        return PlainSealedStore(config.sealed_dir)  # Gramine's encrypted mount seals it
    return DevSealedStore(config.sealed_dir, measurement_of(provider))


def _export(config: EdgeConfig, pki: DevPKI | None) -> None:
    """Write the dev root and collateral for devices (after the edge is listening)."""
    from secure_ci.edge._state import write_atomic

    if pki is None or config.export_dir is None:
        return
    config.export_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(config.export_dir / "dev-root.pem", pki.root_pem.encode(), 0o644)
    write_atomic(config.export_dir / "collateral.json", pki.collateral_json.encode(), 0o644)


async def _serve(
    config: EdgeConfig,
    provider: EvidenceProvider,
    pki: DevPKI | None,
    models: ModelRegistry,
    identity: EnclaveIdentity,
    journal: RecordSink,
    allowed_devices: Container[bytes] | None,
    supervisor: asyncio.Task[None] | None = None,
) -> int:
    from secure_ci.edge import open_edge

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def stopped_by(sig: signal.Signals) -> None:
        _STOPPED_BY.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped_by, sig)
    async with open_edge(
        config, provider=provider, models=models, journal=journal, identity=identity,
        allowed_devices=allowed_devices,
    ) as edge:  # fmt: skip
        _export(config, pki)
        typer.echo(f"listening {config.host}:{edge.port}")
        typer.echo(f"enclave {identity.address_text}")
        typer.echo(f"mrenclave {identity.measurement.hex()}")
        typer.echo(f"quote_id {identity.quote_id.hex()}")
        for entry in models.entries():
            typer.echo(f"model {entry.model_id.hex()} cut {entry.cut}")
        typer.echo("ready")
        log.info("serving on %s:%d as %s", config.host, edge.port, identity.address_text)
        waiters: set[asyncio.Task[Any]] = {asyncio.create_task(stop.wait())}
        if supervisor is not None:
            waiters.add(supervisor)  # ends early only on a configuration error
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters - {supervisor}:
            waiter.cancel()
        typer.echo("draining")
    return edge.stats["results"]


async def _run(
    config: EdgeConfig,
    provider: EvidenceProvider,
    pki: DevPKI | None,
    models: ModelRegistry,
    identity: EnclaveIdentity,
    journal: RecordSink,
    operator_key: bytes | None,
    anchor_only: bool,
    sealed: SealedStore | None = None,
) -> int:
    """Serve; with [ledger], registered on the chain, its devices admitted, journal anchored."""
    from secure_ci.edge import open_edge_ledger
    from secure_ci.ledger._journal import Journal

    if config.ledger is None or operator_key is None:
        if anchor_only:
            raise ConfigError("--anchor-only needs a [ledger] table")
        return await _serve(config, provider, pki, models, identity, journal, None)
    if not isinstance(journal, Journal):
        raise ConfigError("with [ledger] the edge needs its journal (state_dir or journal_dir)")
    served = [entry.model_id for entry in models.entries()]
    async with open_edge_ledger(
        config, identity, operator_key, journal=journal, models=served, sealed=sealed
    ) as ledger:
        typer.echo(f"ledger {ledger.contract}")
        typer.echo(f"chain_id {ledger.chain_id}")
        typer.echo(f"party {ledger.settings.party_id}")
        typer.echo(f"endpoint {ledger.endpoint}")
        if anchor_only:
            typer.echo(f"anchoring {journal.unanchored_records} records, then stopping")
            await ledger.wait_connected()  # leaving the block flushes the journal
            results = 0
        else:
            results = await _serve(
            ledger.edge_config, provider, pki, models, identity, journal, ledger.devices,
            ledger.supervisor,
        )  # fmt: skip
        typer.echo("anchoring")
    typer.echo(f"unanchored {journal.unanchored_records} records")
    return results


def _operator_key(path: Path | None) -> bytes:
    """The party admin's private key: 64 hex digits (optionally 0x) in a file."""
    from secure_ci.cli._keys import load_private_key

    if path is None:
        raise ConfigError("[ledger] needs operator_key_file")
    return load_private_key(path, "operator key")


def _load_config(path: Path) -> EdgeConfig:
    """The edge configuration, with its deployment file read."""
    import dataclasses

    from secure_ci.edge import load_edge_config
    from secure_ci.ledger._deployment import Deployment

    text = read_file(path, "edge config", 1 << 20).decode("utf-8", "replace")
    config = load_edge_config(text, path.resolve().parent)
    settings = config.ledger
    if settings is not None and settings.deployment is not None:
        deployment = Deployment.from_json(read_file(settings.deployment, "deployment", 4096))
        config = dataclasses.replace(config, ledger=settings.with_deployment(deployment))
    return config


@app.command()
def serve(
    config: Annotated[Path, typer.Option("--config", help="Edge configuration (TOML).")],
    log_level: LogLevel = "info",
    anchor_only: Annotated[
        bool,
        typer.Option(
            "--anchor-only",
            help="Serve nothing: anchor what the journal holds, then stop (to retire an edge).",
        ),
    ] = False,
) -> None:
    """Serve the configured models until SIGINT/SIGTERM, then drain in-flight tasks.

    With a state_dir, the enclave key, TLS key and journal persist: a restarted edge is the
    same edge, and anchors every record it acknowledged before.
    """
    import contextlib

    from secure_ci.edge import MemoryJournal, ModelRegistry, create_identity, load_model_tails
    from secure_ci.edge._identity import recover_identity
    from secure_ci.edge._state import StateLock
    from secure_ci.ledger._journal import Journal

    set_log_level(log_level)
    edge_config = _load_config(config)
    operator_key = None
    if edge_config.ledger is not None:
        operator_key = _operator_key(edge_config.ledger.operator_key_file)
    with contextlib.ExitStack() as stack:
        if edge_config.state_dir is not None:
            stack.enter_context(StateLock(edge_config.state_dir))
        provider, pki = _provider(edge_config)
        models = ModelRegistry()
        if not anchor_only:
            for spec in edge_config.models:
                for tail in load_model_tails(spec):
                    models.add(tail)
        store = _sealed_store(edge_config, provider)
        now = int(time.time())
        if store is None:
            identity, recovered = create_identity(provider, now=now), False
        else:
            identity, recovered = recover_identity(provider, store, now=now)
        log.info(
            "%s enclave key %s (measurement %s)",
            "recovered sealed" if recovered else "created new", identity.address_text,
            identity.measurement.hex(),
        )  # fmt: skip
        if edge_config.journal_dir is None:
            journal: RecordSink = MemoryJournal()
        else:
            edge_config.journal_dir.mkdir(parents=True, exist_ok=True)
            path = edge_config.journal_dir / f"edge-{identity.address.hex()}.sqlite"
            journal = stack.enter_context(Journal.open(path, edge=identity.address))
            log.info("journal %s: %d records", path, journal.next_seq)
        results = asyncio.run(_run(
            edge_config, provider, pki, models, identity, journal, operator_key, anchor_only, store
        ))  # fmt: skip
    typer.echo(f"stopped after {results} results")
    if signal.SIGINT in _STOPPED_BY:
        raise typer.Exit(130)  # drained and anchored first, then the Ctrl-C exit code
