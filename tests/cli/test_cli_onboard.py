"""Onboarding from the command line, each step signed by the key that may do it, on anvil;
a step signed by the wrong key is refused with the contract's error and what to do."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account

from secure_ci.ledger import AnvilNode, find_anvil, open_ledger, run_anvil

BIN = Path(sys.executable).parent / "secure-ci"
MEASUREMENT = "5e" * 32
pytestmark = [
    pytest.mark.anvil,
    pytest.mark.skipif(find_anvil() is None, reason="anvil missing (run `make node`)"),
]


@pytest.fixture(scope="module")
def anvil() -> Iterator[AnvilNode]:
    with run_anvil() as node:
        yield node


def cli(cwd: Path, *args: str, code: int = 0) -> str:
    done = subprocess.run(
        [str(BIN), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "CAM_PASS": "a passphrase"},
    )  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, (done.stdout, done.stderr)
    return done.stdout + done.stderr


def test_onboarding_signed_by_the_right_keys(anvil: AnvilNode, tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"dev-{i}.key").write_text(anvil.keys[i] + "\n")
    dep = ["--deployment", "deployment.json"]
    cli(tmp_path, "ledger", "deploy", "--rpc", anvil.url, "--key-file", "dev-0.key")
    admin = Account.from_key(anvil.keys[1]).address
    assert "party 2" in cli(tmp_path, "ledger", "party", "add", admin, "--key-file", "dev-0.key",
                            *dep)  # fmt: skip
    refused = cli(tmp_path, "ledger", "party", "add", admin, "--key-file", "dev-2.key", *dep,
                  code=1)  # fmt: skip
    assert "NotParty" in refused
    assert "admin key of a party" in refused
    for verb in ("allow", "revoke"):
        assert verb in cli(tmp_path, "ledger", "measurement", verb, MEASUREMENT, "--key-file",
                           "dev-0.key", *dep)  # fmt: skip
    cli(tmp_path, "device", "keygen", "--out", "cam.json", "--passphrase-env", "CAM_PASS",
        "--scrypt-n", "1024")  # fmt: skip
    device = Account.from_key(
        Account.decrypt(json.loads((tmp_path / "cam.json").read_text()), "a passphrase")
    )
    register = ["ledger", "device", "register", "--identity", "cam.json", "--passphrase-env",
                "CAM_PASS", "--party", "2", *dep]  # fmt: skip
    wrong = cli(tmp_path, *register, "--key-file", "dev-2.key", code=1)
    assert "NotPartyAdmin" in wrong
    cli(tmp_path, *register, "--key-file", "dev-1.key")
    revoke = ["ledger", "device", "revoke", device.address, *dep]
    cli(tmp_path, *revoke, "--key-file", "dev-1.key")
    assert "edge(s)" in cli(tmp_path, "ledger", "edges", *dep)

    async def state() -> tuple[bool, bool, int]:
        async with open_ledger(anvil.url, contract_address=_contract(tmp_path)) as ledger:
            return (
                await ledger.is_allowed_measurement(bytes.fromhex(MEASUREMENT)),
                await ledger.is_registered_device(device.address),
                await ledger.party_count(),
            )

    assert asyncio.run(state()) == (False, False, 2)


def _contract(path: Path) -> str:
    return str(json.loads((path / "deployment.json").read_text())["contract"])
