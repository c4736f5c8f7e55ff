"""`secure-ci edge ...`: Run the enclave-hosted edge service."""

from __future__ import annotations

import asyncio
import signal
import time
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


async def _run(
    config: EdgeConfig,
    provider: EvidenceProvider,
    models: ModelRegistry,
    identity: EnclaveIdentity,
    journal: RecordSink,
) -> int:
    from secure_ci.edge import open_edge

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with open_edge(
        config, provider=provider, models=models, journal=journal, identity=identity
    ) as edge:
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
