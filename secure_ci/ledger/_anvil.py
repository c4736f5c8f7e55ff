"""Start and stop the pinned anvil (``ledger/node_modules``) on loopback, for tests and
``secure-ci ledger up``.

The node gets a free port on 127.0.0.1, the well-known development mnemonic (so its funded
keys are reproducible) and the same hardfork as the in-process chain. Every wait is bounded
and the process is always terminated (then killed) when the context exits.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import platform
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from eth_account import Account

from secure_ci.exceptions import ChainError

__all__ = ["DEV_MNEMONIC", "AnvilNode", "default_ledger_dir", "dev_keys", "find_anvil", "run_anvil"]

DEV_MNEMONIC = "test test test test test test test test test test test junk"
"""anvil's (and hardhat's) public development mnemonic: its keys hold no real value."""
HARDFORK = "prague"  # what eth-tester's py-evm backend runs
_PLATFORMS = {("Linux", "x86_64"): "linux-amd64", ("Linux", "aarch64"): "linux-arm64"}
_PLATFORMS |= {("Darwin", "arm64"): "darwin-arm64", ("Darwin", "x86_64"): "darwin-amd64"}


@dataclass(frozen=True)
class AnvilNode:
    """A running anvil: its JSON-RPC URL, chain id and funded development keys (hex)."""

    url: str
    port: int
    chain_id: int
    keys: tuple[str, ...]
    process: subprocess.Popen[bytes] = field(repr=False, compare=False)

    def wait(self) -> int:
        """Block until anvil exits (``ledger up`` runs it in the foreground); its exit code."""
        return self.process.wait()


def default_ledger_dir() -> Path:
    """``ledger/`` of the source checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "ledger"


def find_anvil(ledger_dir: Path | None = None) -> Path | None:
    """The platform's anvil binary installed by ``npm ci`` in ``ledger/``, if any."""
    modules = (ledger_dir or default_ledger_dir()) / "node_modules" / "@foundry-rs"
    suffix = _PLATFORMS.get((platform.system(), platform.machine()))
    if suffix is None:
        return None
    binary = modules / f"anvil-{suffix}" / "bin" / "anvil"
    return binary if binary.is_file() else None


def dev_keys(count: int) -> tuple[str, ...]:
    """The first ``count`` private keys of :data:`DEV_MNEMONIC` (anvil's funded accounts)."""
    Account.enable_unaudited_hdwallet_features()
    return tuple(
        "0x" + Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}").key.hex()
        for i in range(count)
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _chain_id(port: int) -> int | None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("POST", "/", body, {"Content-Type": "application/json"})
        reply = json.loads(conn.getresponse().read(4096))
        return int(reply["result"], 16)
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read()[-2000:].decode(errors="replace")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextlib.contextmanager
def run_anvil(
    *,
    binary: Path | None = None,
    port: int | None = None,
    chain_id: int = 31337,
    accounts: int = 10,
    startup_timeout: float = 30.0,
    host: str = "127.0.0.1",
    hardfork: str = HARDFORK,
) -> Iterator[AnvilNode]:
    """Run anvil until the context exits; raises ChainError if it does not come up."""
    binary = binary or find_anvil()
    if binary is None:
        raise ChainError("anvil is not installed: run `make node` (npm ci in ledger/)")
    chosen = port or _free_port()
    args = [str(binary), "--host", host, "--port", str(chosen), "--chain-id", str(chain_id)]
    args += ["--accounts", str(accounts), "--mnemonic", DEV_MNEMONIC, "--hardfork", hardfork]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(  # noqa: S603  (fixed argv, no shell)
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + startup_timeout
            while _chain_id(chosen) != chain_id:
                if process.poll() is not None:
                    raise ChainError(f"anvil exited with {process.returncode}: {_tail(log)}")
                if time.monotonic() > deadline:
                    raise ChainError(f"anvil did not answer within {startup_timeout}s")
                time.sleep(0.05)
            url = f"http://{host}:{chosen}"
            yield AnvilNode(url, chosen, chain_id, dev_keys(accounts), process)
        finally:
            _stop(process)
