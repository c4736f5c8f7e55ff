"""Key files: encrypted keystores (Ethereum keystore v3 JSON) and, for development, raw hex.

``secure-ci device keygen`` writes keystores; every command that signs takes a key file and
reads its passphrase from a file (``--passphrase-file``), an environment variable named by
``--passphrase-env``, or a prompt when standard input is a terminal. Hex files (64 hex digits)
are accepted for the funded development keys that ``secure-ci ledger up`` writes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from secure_ci.cli._common import read_file
from secure_ci.exceptions import ConfigError

__all__ = [
    "Passphrase",
    "PassphraseEnv",
    "PassphraseFile",
    "load_private_key",
    "new_passphrase",
    "write_keystore",
]

MAX_KEY_FILE = 16 * 1024
PassphraseFile = Annotated[
    Path | None, typer.Option("--passphrase-file", help="Read the keystore passphrase from FILE.")
]
PassphraseEnv = Annotated[
    str | None,
    typer.Option("--passphrase-env", help="Read the keystore passphrase from environment VAR."),
]


class Passphrase:
    """Where a keystore passphrase comes from (file, environment variable or prompt)."""

    def __init__(self, file: Path | None = None, env: str | None = None) -> None:
        if file is not None and env is not None:
            raise ConfigError("give --passphrase-file or --passphrase-env, not both")
        self.file, self.env = file, env

    def read(self, what: str, *, confirm: bool = False) -> str:
        if self.file is not None:
            text = read_file(self.file, "passphrase file", 4096).decode("utf-8", "replace")
            return text.rstrip("\r\n")
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"environment variable {self.env} is not set")
            return value
        if not sys.stdin.isatty():
            raise ConfigError(
                f"{what} needs a passphrase: give --passphrase-file FILE or --passphrase-env VAR"
            )
        value = str(typer.prompt(f"Passphrase for {what}", hide_input=True))
        if confirm and value != typer.prompt("Repeat the passphrase", hide_input=True):
            raise ConfigError("the passphrases differ")
        return value


def new_passphrase(passphrase: Passphrase, what: str) -> str:
    value = passphrase.read(what, confirm=True)
    if not value:
        raise ConfigError("an empty passphrase protects nothing: choose one")
    return value


def load_private_key(path: Path, what: str, passphrase: Passphrase | None = None) -> bytes:
    """The 32-byte private key in ``path``: a keystore (decrypted) or 64 hex digits."""
    from eth_account import Account

    data = read_file(path, what, MAX_KEY_FILE)
    text = data.decode("utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            keystore = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{what} {path} is not a keystore: {exc}") from None
        secret = (passphrase or Passphrase()).read(f"{what} {path}")
        try:
            return bytes(Account.decrypt(keystore, secret))
        except ValueError as exc:
            reason = "wrong passphrase" if "MAC" in str(exc) else str(exc)
            raise ConfigError(f"cannot decrypt {what} {path}: {reason}") from None
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{what} {path} is not a keystore (missing {exc})") from None
    body = text.removeprefix("0x")
    if len(body) != 64:
        raise ConfigError(f"{path} must hold a keystore or a 32-byte hex private key ({what})")
    try:
        return bytes.fromhex(body)
    except ValueError:
        raise ConfigError(
            f"{path} must hold a keystore or a 32-byte hex private key ({what})"
        ) from None


def write_keystore(path: Path, key: bytes, passphrase: str, *, scrypt_n: int | None = None) -> None:
    """Write ``key`` encrypted to ``path`` (refusing to overwrite a file)."""
    from eth_account import Account

    keystore = Account.encrypt(key, passphrase, kdf="scrypt", iterations=scrypt_n)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists: keygen never overwrites a key") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "w") as f:
        json.dump(keystore, f)
        f.write("\n")
