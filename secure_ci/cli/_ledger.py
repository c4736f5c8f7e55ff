"""`secure-ci ledger ...`: Run and manage the ledger chain and contract."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer

app = typer.Typer(help="Run and manage the ledger chain and contract.", no_args_is_help=True)

DEFAULT_RPC = "http://127.0.0.1:8545"
_RPC = Annotated[str, typer.Option("--rpc", help="JSON-RPC URL of the chain.")]


@app.command()
def up(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8545,
    chain_id: Annotated[int, typer.Option(help="Chain id.")] = 31337,
    accounts: Annotated[int, typer.Option(help="Funded development accounts.")] = 10,
) -> None:
    """Run the pinned anvil in the foreground until Ctrl-C; print its URL and dev keys."""
    from eth_account import Account

    from secure_ci.ledger import run_anvil

    with run_anvil(port=port, chain_id=chain_id, accounts=accounts) as node:
        typer.echo(f"anvil listening on {node.url} (chain id {node.chain_id})")
        typer.echo("funded development keys (public mnemonic: never use them for value):")
        for key in node.keys:
            typer.echo(f"  {Account.from_key(key).address}  {key}")
        typer.echo("Ctrl-C to stop")
        try:
            code = node.wait()
        except KeyboardInterrupt:
            code = 0
    if code:
        raise typer.Exit(1)


@app.command()
def deploy(
    rpc: _RPC = DEFAULT_RPC,
    key: Annotated[
        str | None,
        typer.Option(
            envvar="SECURE_CI_LEDGER_KEY",
            help="Owner private key (hex); default: the first anvil development key.",
        ),
    ] = None,
    window: Annotated[int, typer.Option(help="Challenge window in seconds.")] = 3600,
) -> None:
    """Deploy SecureCILedger and print its address."""
    from eth_account import Account

    from secure_ci.exceptions import ConfigError
    from secure_ci.ledger import open_ledger
    from secure_ci.ledger._anvil import dev_keys

    try:
        owner = Account.from_key(key or dev_keys(1)[0])
    except ValueError as exc:
        raise ConfigError("--key is not a private key") from exc

    async def run() -> str:
        async with open_ledger(rpc, deployer=owner, challenge_window=window) as ledger:
            return ledger.address

    typer.echo(asyncio.run(run()))


@app.command()
def status(
    contract: Annotated[
        str, typer.Option(envvar="SECURE_CI_LEDGER_CONTRACT", help="Contract address.")
    ],
    rpc: _RPC = DEFAULT_RPC,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the chain, the contract and every edge's batch chain."""
    from secure_ci.ledger import open_ledger

    async def run() -> dict[str, Any]:
        async with open_ledger(rpc, contract_address=contract) as ledger:
            edges = []
            for edge in await ledger.edges():
                state = await ledger.edge_state(edge)
                edges.append(
                    {
                        "edge": edge,
                        "active": state.active,
                        "batches": state.next_batch_id,
                        "records": state.next_seq,
                        "head": "0x" + state.head.hex(),
                        "omissions": state.omissions,
                        "measurement": "0x" + state.measurement.hex(),
                    }
                )
            return {
                "rpc": rpc,
                "chain_id": ledger.chain_id,
                "block": await ledger.block_number(),
                "contract": ledger.address,
                "owner": await ledger.contract_owner(),
                "parties": await ledger.party_count(),
                "challenge_window": await ledger.challenge_window(),
                "edges": edges,
            }

    summary = asyncio.run(run())
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for name in ("rpc", "chain_id", "block", "contract", "owner", "parties", "challenge_window"):
        typer.echo(f"{name}: {summary[name]}")
    for e in summary["edges"]:
        flag = "active" if e["active"] else "revoked"
        typer.echo(
            f"edge {e['edge']} ({flag}): {e['batches']} batches, {e['records']} records, "
            f"{e['omissions']} omissions, head {e['head'][:18]}…"
        )
