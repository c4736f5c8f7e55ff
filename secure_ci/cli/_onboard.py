"""`secure-ci ledger party|measurement|model|device ...`: onboarding, signed by the right key.

Parties, measurements and models are governed by the parties, k of n (see ``_governance``):
``party add``, ``measurement allow`` and ``model register`` propose, signed by a party's admin,
and execute at once when the threshold is met (k = 1), else print the proposal for the other
parties to approve; ``measurement revoke`` suspends at once. A party's admin registers its
devices: a device's registration carries the device key's own proof of possession, so the
admin needs the device's keystore (or runs the command where the device key is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from secure_ci.cli._common import DeploymentOption
from secure_ci.cli._governance import announce, describe_release, release_window, signer
from secure_ci.cli._keys import Passphrase, PassphraseEnv, PassphraseFile, load_private_key
from secure_ci.cli._ledger import ContractOption, RpcOption, opened, run
from secure_ci.cli._ledger import app as ledger_app
from secure_ci.exceptions import ConfigError

__all__ = ["device_app", "measurement_app", "model_app", "party_app"]

party_app = typer.Typer(help="Parties (the owner adds them).", no_args_is_help=True)
measurement_app = typer.Typer(help="The measurement allow-list (owner).", no_args_is_help=True)
model_app = typer.Typer(help="Models (a party's admin registers them).", no_args_is_help=True)
device_app = typer.Typer(help="Devices (a party's admin registers them).", no_args_is_help=True)

KeyFile = Annotated[
    Path, typer.Option("--key-file", help="Signing key: keystore or 64 hex digits.")
]
Party = Annotated[int, typer.Option("--party", help="Party id (from `ledger party add`).")]
NotBefore = Annotated[
    int | None,
    typer.Option("--not-before", help="Unix time the release starts (default: now)."),
]
Days = Annotated[
    float | None, typer.Option("--days", help="Days the release is valid (default 7).")
]
NotAfter = Annotated[
    int | None, typer.Option("--not-after", help="Unix time the release ends (or --days).")
]
Sources = Annotated[
    list[str] | None,
    typer.Option("--source", help="A digest the release was built from (64 hex; repeat)."),
]


def _key(path: Path, what: str, file: Path | None, env: str | None) -> bytes:
    return load_private_key(path, what, Passphrase(file, env))


def _hex(text: str, size: int, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise ConfigError(f"{what} must be hex") from None
    if len(raw) != size:
        raise ConfigError(f"{what} must be {size} bytes ({2 * size} hex digits)")
    return raw


def _address(text: str, what: str) -> str:
    from secure_ci.edge._config import format_address, parse_address

    return format_address(parse_address(text if text.startswith("0x") else "0x" + text))


@party_app.command("add")
def party_add(
    admin: Annotated[str, typer.Argument(help="The new party's admin address.")],
    key_file: KeyFile,
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Propose a party administered by ADMIN (signed by a party's admin); with enough
    approvals it is added at once and its id printed."""
    address = _address(admin, "ADMIN")
    account = signer(key_file, passphrase_file, passphrase_env)

    async def go() -> str:
        async with opened(deployment, rpc, contract) as ledger:
            proposed = await ledger.propose_party(account, address)
            line = await announce(ledger, account, proposed, "")
            return line or f"party {await ledger.party_of(address)} admin {address}"

    typer.echo(run(go()))


def _sources(values: list[str] | None) -> list[bytes]:
    found = [_hex(v, 32, "--source") for v in values or []]
    if len(found) > 16:
        raise ConfigError("a release names at most 16 --source digests")
    return found


@measurement_app.command("allow")
def measurement_allow(
    measurement: Annotated[str, typer.Argument(help="MRENCLAVE (64 hex digits).")],
    key_file: KeyFile,
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    not_before: NotBefore = None,
    days: Days = None,
    not_after: NotAfter = None,
    source: Sources = None,
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Propose an enclave measurement as a release (signed by a party's admin), valid from
    --not-before (and the deployment's notice period) for --days; with enough approvals it
    is executed at once. --source names what it was built from (source, manifest digests)."""
    from secure_ci.ledger import RELEASE_MEASUREMENT

    value = _hex(measurement, 32, "MEASUREMENT")
    sources = _sources(source)
    release_window(0, not_before, days, not_after)  # usage errors before any key or chain
    account = signer(key_file, passphrase_file, passphrase_env)

    async def go() -> str:
        async with opened(deployment, rpc, contract) as ledger:
            if (await ledger.release(RELEASE_MEASUREMENT, value)).suspended:
                raise ConfigError(
                    f"measurement {value.hex()} is suspended: lift it with `secure-ci ledger "
                    f"release lift measurement {value.hex()}`"
                )
            start, end = release_window(await ledger.timestamp(), not_before, days, not_after)
            proposed = await ledger.propose_release(
                account, RELEASE_MEASUREMENT, value, start, end, sources
            )
            line = await announce(ledger, account, proposed, "")
            when = await describe_release(ledger, RELEASE_MEASUREMENT, value)
            return line or f"measurement {value.hex()} allowed ({when})"

    typer.echo(run(go()))


@measurement_app.command("revoke")
def measurement_revoke(
    measurement: Annotated[str, typer.Argument(help="MRENCLAVE (64 hex digits).")],
    key_file: KeyFile,
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Suspend a measurement at once (any one party): its edges can no longer register or
    anchor, and devices refuse them from their next refresh. Lifting needs the threshold."""
    from secure_ci.ledger import RELEASE_MEASUREMENT

    value = _hex(measurement, 32, "MEASUREMENT")
    account = signer(key_file, passphrase_file, passphrase_env)

    async def go() -> None:
        async with opened(deployment, rpc, contract) as ledger:
            await ledger.suspend(account, RELEASE_MEASUREMENT, value)

    run(go())
    typer.echo(f"measurement {value.hex()} revoked (suspended)")


@model_app.command("register")
def model_register(
    package: Annotated[Path, typer.Argument(help="Model package (`secure-ci model pack`).")],
    party: Party,
    key_file: KeyFile,
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    not_before: NotBefore = None,
    days: Days = None,
    not_after: NotAfter = None,
    source: Sources = None,
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Propose PACKAGE's model id as a release owned by PARTY (signed by the party's admin),
    valid from --not-before for --days; with enough approvals it is executed at once."""
    from secure_ci.ledger import RELEASE_MODEL
    from secure_ci.package import load_package

    sources = _sources(source)
    release_window(0, not_before, days, not_after)
    model_id = load_package(package).model_id
    account = signer(key_file, passphrase_file, passphrase_env)

    async def go() -> str:
        async with opened(deployment, rpc, contract) as ledger:
            start, end = release_window(await ledger.timestamp(), not_before, days, not_after)
            proposed = await ledger.propose_release(
                account, RELEASE_MODEL, model_id, start, end, sources, party_id=party
            )
            line = await announce(ledger, account, proposed, "")
            when = await describe_release(ledger, RELEASE_MODEL, model_id)
            return line or f"model {model_id.hex()} registered for party {party} ({when})"

    typer.echo(run(go()))


@device_app.command("register")
def device_register(
    identity: Annotated[
        Path, typer.Option("--identity", help="The device's keystore (`device keygen`).")
    ],
    party: Party,
    key_file: KeyFile,
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
    admin_passphrase_file: Annotated[
        Path | None, typer.Option(help="Passphrase file of --key-file, if it is a keystore.")
    ] = None,
    fund_wei: Annotated[
        int, typer.Option(help="Top the device up to this (it pays for its challenges).")
    ] = 10**16,
) -> None:
    """Register the device of IDENTITY for PARTY: the device key signs its proof of
    possession, the party's admin sends it (and funds the device, which pays for its own
    challenges). --passphrase-* unlock the device keystore."""
    from eth_account import Account

    device = Account.from_key(_key(identity, "device identity", passphrase_file, passphrase_env))
    admin = Account.from_key(_key(key_file, "party admin key", admin_passphrase_file, None))

    if not 0 <= fund_wei <= 10**24:
        raise ConfigError("--fund-wei must be 0..10**24")

    async def go() -> int:
        async with opened(deployment, rpc, contract) as ledger:
            await ledger.register_device(admin, party, device)
            return await ledger.top_up(admin, device.address, fund_wei)

    funded = run(go())
    typer.echo(f"device {device.address} registered for party {party} (sent {funded} wei)")


@device_app.command("revoke")
def device_revoke(
    device: Annotated[str, typer.Argument(help="The device's address.")],
    key_file: KeyFile,
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Revoke a device (signed by its party's admin): edges refuse it from their next refresh."""
    from eth_account import Account

    address = _address(device, "DEVICE")
    admin = Account.from_key(_key(key_file, "party admin key", passphrase_file, passphrase_env))

    async def go() -> None:
        async with opened(deployment, rpc, contract) as ledger:
            await ledger.revoke_device(admin, address)

    run(go())
    typer.echo(f"device {address} revoked")


ledger_app.add_typer(party_app, name="party")
ledger_app.add_typer(measurement_app, name="measurement")
ledger_app.add_typer(model_app, name="model")
ledger_app.add_typer(device_app, name="device")
