"""`secure-ci ledger ...`: run a local chain, deploy the contract, read the registry.

Onboarding (parties, measurements, models, devices) is in ``_onboard``; each of those commands
signs with the key file of the party that may do it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from secure_ci.cli._common import DeploymentOption, load_deployment, read_file
from secure_ci.exceptions import ConfigError

if TYPE_CHECKING:
    from secure_ci.ledger import LedgerClient

app = typer.Typer(help="Run and manage the ledger chain and contract.", no_args_is_help=True)

DEFAULT_RPC = "http://127.0.0.1:8545"
RpcOption = Annotated[
    str | None, typer.Option("--rpc", help="JSON-RPC URL (overrides the deployment's).")
]
ContractOption = Annotated[
    str | None, typer.Option("--contract", help="Contract address (instead of --deployment).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
T = TypeVar("T")


@asynccontextmanager
async def opened(
    deployment: Path | None,
    rpc: str | None,
    contract: str | None,
    owner: bytes | None = None,
) -> AsyncIterator[LedgerClient]:
    """The deployment's contract (never deploys); ``owner`` signs owner-only calls."""
    from eth_account import Account

    from secure_ci.ledger import open_ledger
    from secure_ci.ledger._deployment import Deployment

    found = load_deployment(deployment, rpc, contract)
    url, address = (
        (found.rpc, found.contract_text) if isinstance(found, Deployment) else found
    )  # fmt: skip
    if url == "inprocess":
        raise ConfigError("the in-process chain lives in one process: give a node's --rpc URL")
    account = Account.from_key(owner) if owner is not None else None
    async with open_ledger(url, contract_address=address, deployer=account) as client:
        if isinstance(found, Deployment) and client.chain_id != found.chain_id:
            raise ConfigError(
                f"the node at {url} runs chain {client.chain_id}, the deployment is on chain "
                f"{found.chain_id}"
            )
        yield client


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ConfigError(f"port {port} on 127.0.0.1 is in use ({exc.strerror})") from None


@app.command()
def up(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8545,
    chain_id: Annotated[int, typer.Option(help="Chain id.")] = 31337,
    accounts: Annotated[int, typer.Option(help="Funded development accounts.")] = 10,
    keys_dir: Annotated[
        Path | None,
        typer.Option(help="Write each funded development key to DIR/dev-N.key (hex, 0600)."),
    ] = None,
) -> None:
    """Run the pinned anvil in the foreground until Ctrl-C or SIGTERM; print its dev keys."""
    from eth_account import Account

    from secure_ci.edge._state import write_atomic
    from secure_ci.ledger import run_anvil

    if not 1 <= port <= 65535 or not 1 <= accounts <= 100:
        raise ConfigError("--port must be 1..65535 and --accounts 1..100")
    _port_free(port)

    def terminated(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds run_anvil, which stops anvil

    signal.signal(signal.SIGTERM, terminated)
    with run_anvil(port=port, chain_id=chain_id, accounts=accounts) as node:
        typer.echo(f"anvil listening on {node.url} (chain id {node.chain_id})")
        typer.echo("funded development keys (public mnemonic: never use them for value):")
        for i, key in enumerate(node.keys):
            typer.echo(f"  {i}  {Account.from_key(key).address}  {key}")
            if keys_dir is not None:
                keys_dir.mkdir(parents=True, exist_ok=True)
                write_atomic(keys_dir / f"dev-{i}.key", (key + "\n").encode())
        if keys_dir is not None:
            typer.echo(f"keys written to {keys_dir}/dev-N.key")
        typer.echo("Ctrl-C to stop", nl=True)
        code = node.wait()
    if code:
        raise ConfigError(f"anvil exited with {code}")


@app.command()
def deploy(
    key_file: Annotated[
        Path, typer.Option("--key-file", help="The owner's key (keystore or hex); it pays.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Deployment file to write.")] = Path(
        "deployment.json"
    ),
    rpc: Annotated[str, typer.Option("--rpc", help="JSON-RPC URL of the chain.")] = DEFAULT_RPC,
    window: Annotated[int, typer.Option(help="Challenge window in seconds.")] = 3600,
    threshold: Annotated[
        int,
        typer.Option(help="Approvals (k of the n parties) adding a party or a release needs."),
    ] = 1,
    notice: Annotated[
        int,
        typer.Option(help="Seconds from approving a new release to its becoming valid."),
    ] = 0,
    founder: Annotated[
        list[str] | None,
        typer.Option(
            "--founder",
            help="Admin address of a founding party (parties 2, 3, ...; the owner's key "
            "administers party 1). Repeat.",
        ),
    ] = None,
    passphrase_file: Annotated[Path | None, typer.Option("--passphrase-file")] = None,
    passphrase_env: Annotated[str | None, typer.Option("--passphrase-env")] = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Overwrite OUT only if the new deployment is the same contract (a dev chain "
            "restarted: the same owner key redeploys at the same address).",
        ),
    ] = False,
) -> None:
    """Deploy SecureCILedger (KEY_FILE's key administers party 1, --founder ones follow) with
    k = --threshold and a --notice period for releases, and write the deployment file."""
    from eth_account import Account

    from secure_ci.cli._keys import Passphrase, load_private_key
    from secure_ci.edge._config import format_address, parse_address
    from secure_ci.edge._state import write_atomic
    from secure_ci.ledger import GovernanceSettings, open_ledger
    from secure_ci.ledger._deployment import Deployment, check_rpc_url

    check_rpc_url(rpc, "--rpc")
    if not 0 <= notice < 2**63:
        raise ConfigError("--notice must be a whole number of seconds >= 0")
    founders = tuple(
        format_address(parse_address(f if f.startswith("0x") else "0x" + f)) for f in founder or []
    )
    governance = GovernanceSettings(founders, threshold, notice)
    old = None
    if out.exists():
        if not replace:
            raise ConfigError(f"{out} exists: a deployment file is never overwritten")
        old = Deployment.from_json(read_file(out, "deployment", 4096))
    key = load_private_key(key_file, "owner key", Passphrase(passphrase_file, passphrase_env))
    if Account.from_key(key).address in founders:
        raise ConfigError("--founder lists the owner's own address: it administers party 1")

    async def go() -> Deployment:
        async with open_ledger(
            rpc, deployer=Account.from_key(key), challenge_window=window, governance=governance
        ) as c:
            block = c.deployment_block if c.deployment_block is not None else 0
            return Deployment(c.chain_id, bytes.fromhex(c.address[2:]), block, rpc)

    found = run(go())
    if old is not None and (old.chain_id, old.contract) != (found.chain_id, found.contract):
        raise ConfigError(
            f"the new contract {found.contract_text} (chain {found.chain_id}) is not the one in "
            f"{out}; {out} is left as it was: write the new deployment to another file"
        )
    write_atomic(out, (found.to_json() + "\n").encode(), 0o644)
    typer.echo(f"contract {found.contract_text}")
    typer.echo(f"chain_id {found.chain_id}")
    typer.echo(f"deployment_block {found.deployment_block}")
    typer.echo(f"parties {1 + len(founders)}, threshold {threshold}, notice period {notice} s")
    typer.echo(f"wrote {out}")


@app.command()
def status(
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the chain, the contract and every edge's batch chain."""

    async def go() -> dict[str, Any]:
        async with opened(deployment, rpc, contract) as ledger:
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
                "chain_id": ledger.chain_id,
                "block": await ledger.block_number(),
                "contract": ledger.address,
                "owner": await ledger.contract_owner(),
                "parties": await ledger.party_count(),
                "threshold": await ledger.threshold(),
                "notice_period": await ledger.notice_period(),
                "challenge_window": await ledger.challenge_window(),
                "edges": edges,
            }

    summary = run(go())
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for name in (
        "chain_id", "block", "contract", "owner", "parties", "threshold", "notice_period",
        "challenge_window",
    ):  # fmt: skip
        typer.echo(f"{name}: {summary[name]}")
    for e in summary["edges"]:
        flag = "active" if e["active"] else "revoked"
        typer.echo(
            f"edge {e['edge']} ({flag}): {e['batches']} batches, {e['records']} records, "
            f"{e['omissions']} omissions, head {e['head'][:18]}…"
        )


@app.command()
def edges(
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    as_json: JsonOption = False,
) -> None:
    """The edge registry: endpoint, enclave key, measurement, quote id and state."""

    async def go() -> list[dict[str, Any]]:
        async with opened(deployment, rpc, contract) as ledger:
            return [e.as_json() for e in await ledger.registered_edges()]

    rows = run(go())
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "active" if row["active"] else "revoked"
        if row["active"] and not row["measurement_allowed"]:
            state = "measurement not allowed"
        typer.echo(
            f"{row['edge']}  {row['endpoint']}  party {row['party']}  {state}  "
            f"measurement {row['measurement'][:16]}…  quote {row['quote_id'][:16]}…"
        )
    typer.echo(f"{len(rows)} edge(s)")
