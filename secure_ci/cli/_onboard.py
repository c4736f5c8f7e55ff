"""`secure-ci ledger party|measurement|model|device ...`: onboarding, signed by the right key.

The deployment's owner adds parties and allows measurements; a party's admin registers its
models and devices. A device's registration carries the device key's own proof of possession,
so the admin needs the device's keystore (or runs the command where the device key is).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from secure_ci.cli._common import DeploymentOption
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
    """Add a party administered by ADMIN (signed by the deployment's owner); print its id."""
    address = _address(admin, "ADMIN")
    owner = _key(key_file, "owner key", passphrase_file, passphrase_env)

    async def go() -> int:
        async with opened(deployment, rpc, contract, owner) as ledger:
            return await ledger.register_party(address)

    typer.echo(f"party {run(go())} admin {address}")


def _measurement_command(allowed: bool) -> Callable[..., None]:
    """``measurement allow`` or ``measurement revoke`` (one body, two commands)."""

    def command(
        measurement: Annotated[str, typer.Argument(help="MRENCLAVE (64 hex digits).")],
        key_file: KeyFile,
        deployment: DeploymentOption = None,
        rpc: RpcOption = None,
        contract: ContractOption = None,
        passphrase_file: PassphraseFile = None,
        passphrase_env: PassphraseEnv = None,
    ) -> None:
        value = _hex(measurement, 32, "MEASUREMENT")
        owner = _key(key_file, "owner key", passphrase_file, passphrase_env)

        async def go() -> None:
            async with opened(deployment, rpc, contract, owner) as ledger:
                await ledger.allow_measurement(value, allowed)

        run(go())
        typer.echo(f"measurement {value.hex()} {'allowed' if allowed else 'revoked'}")

    command.__doc__ = (
        "Allow an enclave measurement (signed by the deployment's owner)."
        if allowed
        else "Take a measurement off the allow-list: devices refuse its edges from now on."
    )
    return command


measurement_app.command("allow")(_measurement_command(True))
measurement_app.command("revoke")(_measurement_command(False))


@model_app.command("register")
def model_register(
    package: Annotated[Path, typer.Argument(help="Model package (`secure-ci model pack`).")],
    party: Party,
    key_file: KeyFile,
    deployment: DeploymentOption = None,
    rpc: RpcOption = None,
    contract: ContractOption = None,
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Register PACKAGE's model id for PARTY (signed by the party's admin)."""
    from secure_ci.package import load_package

    model_id = load_package(package).model_id
    admin = _key(key_file, "party admin key", passphrase_file, passphrase_env)

    async def go() -> None:
        from eth_account import Account

        async with opened(deployment, rpc, contract) as ledger:
            await ledger.register_model(Account.from_key(admin), party, model_id)

    run(go())
    typer.echo(f"model {model_id.hex()} registered for party {party}")


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
