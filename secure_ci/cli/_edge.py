"""`secure-ci edge ...`: Run the enclave-hosted edge service."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Container
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from secure_ci.exceptions import ConfigError

if TYPE_CHECKING:
    from secure_ci.attestation import EvidenceProvider
    from secure_ci.edge import EdgeConfig, EnclaveIdentity, ModelRegistry, RecordSink

app = typer.Typer(help="Run the enclave-hosted edge service.", no_args_is_help=True)


def _provider(config: EdgeConfig) -> EvidenceProvider:
    """The configured provider; a simulated one exports its dev root and collateral."""
    from secure_ci.attestation import DevPKI, SimulatedProvider, open_provider

    simulated = None
    if config.provider in ("simulated", "auto"):
        pki = DevPKI.generate(int(time.time()))
        simulated = SimulatedProvider(pki, mrenclave=config.mrenclave, mrsigner=config.mrsigner)
        if config.export_dir is not None:
            config.export_dir.mkdir(parents=True, exist_ok=True)
            (config.export_dir / "dev-root.pem").write_text(pki.root_pem)
            (config.export_dir / "collateral.json").write_text(pki.collateral_json)
    kind = {"auto": "auto", "simulated": "simulated", "gramine": "gramine"}[config.provider]
    return open_provider(kind, simulated=simulated)  # type: ignore[arg-type]


async def _serve(
    config: EdgeConfig,
    provider: EvidenceProvider,
    models: ModelRegistry,
    identity: EnclaveIdentity,
    journal: RecordSink,
    allowed_devices: Container[bytes] | None,
) -> int:
    from secure_ci.edge import open_edge

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with open_edge(
        config, provider=provider, models=models, journal=journal, identity=identity,
        allowed_devices=allowed_devices,
    ) as edge:  # fmt: skip
        typer.echo(f"listening {config.host}:{edge.port}")
        typer.echo(f"enclave {identity.address_text}")
        typer.echo(f"mrenclave {identity.measurement.hex()}")
        typer.echo(f"quote_id {identity.quote_id.hex()}")
        for entry in models.entries():
            typer.echo(f"model {entry.model_id.hex()} cut {entry.cut}")
        typer.echo("ready")
        await stop.wait()
        typer.echo("draining")
    return edge.stats["results"]


async def _run(
    config: EdgeConfig,
    provider: EvidenceProvider,
    models: ModelRegistry,
    identity: EnclaveIdentity,
    journal: RecordSink,
) -> int:
    """Serve; with [ledger], registered on the chain, its devices admitted, journal anchored."""
    from secure_ci.edge import open_edge_ledger
    from secure_ci.ledger._journal import Journal

    if config.ledger is None:
        return await _serve(config, provider, models, identity, journal, None)
    if not isinstance(journal, Journal):
        raise ConfigError("with [ledger] the edge needs its journal (journal_dir)")
    key = _operator_key(config.ledger.operator_key_file)
    async with open_edge_ledger(config, identity, key, journal=journal) as ledger:
        typer.echo(f"ledger {ledger.contract}")
        typer.echo(f"chain_id {ledger.chain_id}")
        typer.echo(f"party {ledger.settings.party_id}")
        typer.echo(f"registered {ledger.endpoint}")
        typer.echo(f"funded_wei {ledger.funded_wei}")
        typer.echo(f"devices {len(ledger.devices)}")
        results = await _serve(
            ledger.edge_config, provider, models, identity, journal, ledger.devices
        )
        typer.echo("anchoring")
    typer.echo(f"anchored {journal.next_seq - journal.pending} records")
    return results


def _operator_key(path: Path | None) -> bytes:
    """The party admin's private key: 64 hex digits (optionally 0x) in a file."""
    if path is None:
        raise ConfigError("[ledger] needs operator_key_file")
    try:
        text = path.read_text().strip().removeprefix("0x")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the operator key {path}: {exc}") from exc
    if len(text) != 64:
        raise ConfigError(f"{path} must hold a 32-byte hex private key")
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise ConfigError(f"{path} must hold a 32-byte hex private key") from exc


@app.command()
def serve(
    config: Annotated[Path, typer.Option("--config", help="Edge configuration (TOML).")],
) -> None:
    """Serve the configured models until SIGINT/SIGTERM, then drain in-flight tasks."""
    from secure_ci.edge import (
        MemoryJournal,
        ModelRegistry,
        create_identity,
        load_edge_config,
        load_zoo_tails,
    )
    from secure_ci.ledger._journal import Journal

    try:
        text = config.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {config}: {exc.strerror or exc}") from exc
    edge_config = load_edge_config(text, config.resolve().parent)
    provider = _provider(edge_config)
    models = ModelRegistry()
    for spec in edge_config.models:
        for tail in load_zoo_tails(spec.zoo, spec.cuts, spec.codecs, spec.seed):
            models.add(tail)
    identity = create_identity(provider, now=int(time.time()))
    if edge_config.journal_dir is None:
        results = asyncio.run(_run(edge_config, provider, models, identity, MemoryJournal()))
    else:
        edge_config.journal_dir.mkdir(parents=True, exist_ok=True)
        path = edge_config.journal_dir / f"edge-{identity.address.hex()}.sqlite"
        with Journal.open(path, edge=identity.address) as journal:
            results = asyncio.run(_run(edge_config, provider, models, identity, journal))
    typer.echo(f"stopped after {results} results")
