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
from typer.testing import CliRunner

from secure_ci.cli import app, exit_code
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


def test_governance_k_of_n_from_the_command_line(anvil: AnvilNode, tmp_path: Path) -> None:
    """k = 2 of 2 founding parties: one party alone adds nothing, any one suspends at once."""
    for i in range(3):
        (tmp_path / f"dev-{i}.key").write_text(anvil.keys[i] + "\n")
    dep = ["--deployment", "deployment.json"]
    second = Account.from_key(anvil.keys[1]).address
    deployed = cli(tmp_path, "ledger", "deploy", "--rpc", anvil.url, "--key-file", "dev-0.key",
                   "--threshold", "2", "--founder", second, "--notice", "0")  # fmt: skip
    assert "parties 2, threshold 2" in deployed
    status = json.loads(cli(tmp_path, "ledger", "status", *dep, "--json"))
    assert (status["parties"], status["threshold"], status["notice_period"]) == (2, 2, 0)
    proposed = cli(tmp_path, "ledger", "measurement", "allow", MEASUREMENT, "--key-file",
                   "dev-0.key", "--days", "2", "--source", "ab" * 32, *dep)  # fmt: skip
    assert "(1 of 2 approvals)" in proposed
    pid = proposed.split()[1]
    listed = cli(tmp_path, "ledger", "proposal", "list", *dep)
    assert pid in listed
    assert "1 of 2" in listed
    twice = cli(tmp_path, "ledger", "proposal", "approve", pid, "--key-file", "dev-0.key", *dep,
                code=1)  # fmt: skip
    assert "AlreadyApproved" in twice
    early = cli(tmp_path, "ledger", "proposal", "execute", pid, "--key-file", "dev-2.key", *dep,
                code=1)  # fmt: skip
    assert "NotEnoughApprovals" in early
    stranger = cli(tmp_path, "ledger", "proposal", "approve", pid, "--key-file", "dev-2.key",
                   *dep, code=1)  # fmt: skip
    assert "NotParty" in stranger
    done = cli(tmp_path, "ledger", "proposal", "approve", pid, "--key-file", "dev-1.key", *dep)
    assert "approved and executed" in done
    again = cli(tmp_path, "ledger", "proposal", "execute", pid, "--key-file", "dev-1.key", *dep,
                code=1)  # fmt: skip
    assert "ProposalNotPending" in again
    assert "0 proposal(s)" in cli(tmp_path, "ledger", "proposal", "list", *dep)
    assert pid in cli(tmp_path, "ledger", "proposal", "list", "--all", *dep)
    releases = json.loads(cli(tmp_path, "ledger", "release", "list", "--json", *dep))
    assert [(r["digest"], r["state"]) for r in releases] == [(MEASUREMENT, "valid")]
    # any one party suspends at once; lifting needs both
    suspended = cli(tmp_path, "ledger", "release", "suspend", "measurement", MEASUREMENT,
                    "--key-file", "dev-1.key", *dep)  # fmt: skip
    assert "suspended" in suspended
    assert "suspended" in cli(tmp_path, "ledger", "release", "list", *dep)
    refused = cli(tmp_path, "ledger", "measurement", "allow", MEASUREMENT, "--key-file",
                  "dev-0.key", *dep, code=2)  # fmt: skip
    assert "release lift" in refused
    lift = cli(tmp_path, "ledger", "release", "lift", "measurement", MEASUREMENT, "--key-file",
               "dev-0.key", *dep)  # fmt: skip
    assert "(1 of 2 approvals)" in lift
    lifted = cli(tmp_path, "ledger", "proposal", "approve", lift.split()[1], "--key-file",
                 "dev-1.key", *dep)  # fmt: skip
    assert "lift suspension" in lifted
    assert "valid" in cli(tmp_path, "ledger", "release", "list", *dep)
    # a third party needs both too
    third = Account.from_key(anvil.keys[2]).address
    party = cli(tmp_path, "ledger", "party", "add", third, "--key-file", "dev-1.key", *dep)
    assert "add party administered by" in party
    added = cli(tmp_path, "ledger", "proposal", "approve", party.split()[1], "--key-file",
                "dev-0.key", *dep)  # fmt: skip
    assert "executed" in added


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["release", "suspend", "binary", "00" * 32], "KIND must be one of"),
        (["release", "lift", "model", "zz"], "DIGEST must be hex"),
        (["proposal", "approve", "0x1234"], "PROPOSAL must be 32 bytes"),
        (["proposal", "execute", "ab" * 32], "say which ledger"),
        (["measurement", "allow", "5e" * 32, "--days", "1", "--not-after", "9"], "not both"),
        (["measurement", "allow", "5e" * 32, "--days", "0"], "--days must be"),
        (["measurement", "allow", "5e" * 32, "--not-before", "10", "--not-after", "9"], "after"),
        (["measurement", "allow", "5e" * 32, "--source", "ab"], "--source must be 32 bytes"),
        (["deploy", "--threshold", "2"], "threshold must be 1..1"),
        (["deploy", "--threshold", "0", "--founder", "0x" + "11" * 20], "threshold must be"),
        (["deploy", "--notice", "-1"], "--notice must be"),
    ],
)
def test_governance_usage_errors_exit_2(
    tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "k.key"
    key.write_text("11" * 32 + "\n")
    done = CliRunner().invoke(app, ["ledger", *args, "--key-file", str(key)])
    assert done.exception is not None
    assert exit_code(done.exception) == 2
    assert message in capsys.readouterr().err
