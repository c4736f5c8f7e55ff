"""`secure-ci ledger release|proposal ...`: the release registry and k-of-n governance.

Adding a party, a release (measurement or model) or lifting a suspension is a proposal: the
proposing party's approval counts, other parties approve it (``proposal approve``), and once
it has the deployment's threshold of approvals it is executed (at once when the threshold is
met, else by ``proposal execute``, which anyone may send). Any one party suspends a release at
once (``release suspend``, or ``measurement revoke``). Each command signs with ``--key-file``:
the admin key of a party.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from secure_ci.cli._common import DeploymentOption
from secure_ci.cli._keys import Passphrase, PassphraseEnv, PassphraseFile, load_private_key
from secure_ci.cli._ledger import ContractOption, JsonOption, RpcOption, opened, run
from secure_ci.cli._ledger import app as ledger_app
from secure_ci.exceptions import ConfigError

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from secure_ci.ledger import GovernanceTx, LedgerClient

__all__ = [
    "announce",
    "parse_digest",
    "parse_kind",
    "proposal_app",
    "release_app",
    "release_window",
    "signer",
]

release_app = typer.Typer(
    help="Releases (measurements, models): list, suspend, lift.", no_args_is_help=True
)
proposal_app = typer.Typer(
    help="Governance proposals (k of n parties): list, approve, execute.", no_args_is_help=True
)

KeyFile = Annotated[
    Path, typer.Option("--key-file", help="A party admin's key: keystore or 64 hex digits.")
]
Kind = Annotated[str, typer.Argument(help="measurement or model.")]
Digest = Annotated[str, typer.Argument(help="The measurement or model id (64 hex digits).")]
MAX_DAYS = 3650


def parse_kind(text: str) -> int:
    from secure_ci.ledger._governance import RELEASE_KINDS

    if text not in RELEASE_KINDS:
        raise ConfigError(f"KIND must be one of {sorted(RELEASE_KINDS)}, not {text!r}")
    return RELEASE_KINDS[text]


def parse_digest(text: str, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise ConfigError(f"{what} must be hex") from None
    if len(raw) != 32:
        raise ConfigError(f"{what} must be 32 bytes (64 hex digits)")
    return raw


def signer(path: Path, file: Path | None, env: str | None) -> LocalAccount:
    from eth_account import Account

    account: LocalAccount = Account.from_key(
        load_private_key(path, "party admin key", Passphrase(file, env))
    )
    return account


def release_window(
    now: int, not_before: int | None, days: float | None, not_after: int | None
) -> tuple[int, int]:
    """``(not_before, not_after)`` from the options (ConfigError for a window that is not)."""
    start = now if not_before is None else not_before
    if days is not None and not_after is not None:
        raise ConfigError("give --days or --not-after, not both")
    if days is not None and not 0 < days <= MAX_DAYS:
        raise ConfigError(f"--days must be in (0, {MAX_DAYS}]")
    end = not_after if not_after is not None else start + int((days or 7) * 86_400)
    for name, value in (("--not-before", start), ("--not-after", end)):
        if not 0 <= value < 2**64:
            raise ConfigError(f"{name} must be a Unix time")
    if end <= start:
        raise ConfigError("the release must end (--not-after) after it starts (--not-before)")
    return start, end


def _when(timestamp: int) -> str:
    moment = datetime.datetime.fromtimestamp(min(timestamp, 253402300799), datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


async def announce(
    ledger: LedgerClient, sender: LocalAccount, proposed: GovernanceTx, done: str
) -> str:
    """Execute ``proposed`` when it has enough approvals; the line to print."""
    executed = await ledger.execute_if_ready(sender, proposed)
    if executed:
        return done
    info = await ledger.proposal(proposed.proposal_id)
    ident = "0x" + proposed.proposal_id.hex()
    return (
        f"proposal {ident} ({info.approvals} of {await ledger.threshold()} approvals): "
        f"{info.action}; other parties approve it with `secure-ci ledger proposal approve {ident}`"
    )


async def describe_release(ledger: LedgerClient, kind: int, digest: bytes) -> str:
    """``valid FROM to UNTIL`` (and the state now) of a release on chain."""
    release = await ledger.release(kind, digest)
    state = release.state_at(await ledger.timestamp())
    return f"valid {_when(release.not_before)} to {_when(release.not_after)}, {state} now"


@release_app.command("list")
def release_list(
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    as_json: JsonOption = False,
) -> None:
    """Every release on chain with its window, sources digest and state now."""

    async def go() -> list[dict[str, Any]]:
        async with opened(deployment, rpc, contract) as ledger:
            now = await ledger.timestamp()
            return [
                {
                    "kind": "model" if r.kind else "measurement",
                    "digest": r.digest.hex(),
                    "party": r.party_id,
                    "not_before": r.not_before,
                    "not_after": r.not_after,
                    "suspensions": r.suspensions,
                    "sources": r.sources.hex(),
                    "state": r.state_at(now),
                }
                for r in await ledger.releases()
            ]

    rows = run(go())
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        owner = f" party {row['party']}" if row["kind"] == "model" else ""
        typer.echo(
            f"{row['kind']} {row['digest']}{owner}  {row['state']}  "
            f"{_when(row['not_before'])} .. {_when(row['not_after'])}"
        )
    typer.echo(f"{len(rows)} release(s)")


@release_app.command("suspend")
def release_suspend(
    kind: Kind,
    digest: Digest,
    key_file: KeyFile,
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Suspend a release at once (any one party): devices refuse it from their next refresh."""
    value, code = parse_digest(digest, "DIGEST"), parse_kind(kind)
    account = signer(key_file, passphrase_file, passphrase_env)

    async def go() -> None:
        async with opened(deployment, rpc, contract) as ledger:
            await ledger.suspend(account, code, value)

    run(go())
    typer.echo(f"{kind} {value.hex()} suspended")


@release_app.command("lift")
def release_lift(
    kind: Kind,
    digest: Digest,
    key_file: KeyFile,
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Propose lifting a release's suspension (it needs the threshold of approvals)."""
    value, code = parse_digest(digest, "DIGEST"), parse_kind(kind)
    account = signer(key_file, passphrase_file, passphrase_env)

    async def go() -> str:
        async with opened(deployment, rpc, contract) as ledger:
            proposed = await ledger.propose_lift(account, code, value)
            return await announce(ledger, account, proposed, f"{kind} {value.hex()} lifted")

    typer.echo(run(go()))


@proposal_app.command("list")
def proposal_list(
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    every: Annotated[bool, typer.Option("--all", help="Executed ones too.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Pending proposals (with --all, executed ones too) and their approvals."""
    from secure_ci.ledger._deployment import Deployment

    first = 0
    found = None
    if deployment is not None:
        from secure_ci.cli._common import load_deployment

        found = load_deployment(deployment, rpc, contract)
        first = found.deployment_block if isinstance(found, Deployment) else 0

    async def go() -> tuple[int, list[dict[str, Any]]]:
        async with opened(deployment, rpc, contract) as ledger:
            listed = await ledger.proposals(first, pending_only=not every)
            return await ledger.threshold(), [p.as_json() for p in listed]

    threshold, rows = run(go())
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "executed" if row["executed"] else f"{row['approvals']} of {threshold}"
        typer.echo(f"{row['proposal']}  {state}  by party {row['proposer']}: {row['action']}")
    typer.echo(f"{len(rows)} proposal(s)")


@proposal_app.command("approve")
def proposal_approve(
    proposal: Annotated[str, typer.Argument(help="Proposal id (0x + 64 hex digits).")],
    key_file: KeyFile,
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Approve a proposal as your party; once it has the threshold it is executed."""
    pid = parse_digest(proposal, "PROPOSAL")
    account = signer(key_file, passphrase_file, passphrase_env)

    async def go() -> str:
        async with opened(deployment, rpc, contract) as ledger:
            approved = await ledger.approve(account, pid)
            info = await ledger.proposal(pid)
            done = f"proposal 0x{pid.hex()} approved and executed: {info.action}"
            return await announce(ledger, account, approved, done)

    typer.echo(run(go()))


@proposal_app.command("execute")
def proposal_execute(
    proposal: Annotated[str, typer.Argument(help="Proposal id (0x + 64 hex digits).")],
    key_file: KeyFile,
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Execute a proposal that has the threshold of approvals (any key that can pay)."""
    pid = parse_digest(proposal, "PROPOSAL")
    account = signer(key_file, passphrase_file, passphrase_env)

    async def go() -> str:
        async with opened(deployment, rpc, contract) as ledger:
            await ledger.execute(account, pid)
            return (await ledger.proposal(pid)).action

    typer.echo(f"proposal 0x{pid.hex()} executed: {run(go())}")


ledger_app.add_typer(release_app, name="release")
ledger_app.add_typer(proposal_app, name="proposal")
