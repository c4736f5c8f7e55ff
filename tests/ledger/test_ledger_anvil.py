"""The whole ledger flow on both backends (in-process EVM and the pinned anvil), the anvil
helper's lifecycle, and `secure-ci ledger deploy|status` against a live node."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from eth_account import Account
from typer.testing import CliRunner

from secure_ci.cli import app
from secure_ci.exceptions import ChainError, ConfigError, ContractRevertError
from secure_ci.ledger import AnvilNode, LedgerClient, find_anvil, open_ledger, run_anvil
from secure_ci.ledger._deployment import Deployment
from secure_ci.testing import ledger_world

needs_anvil = pytest.mark.skipif(
    find_anvil() is None, reason="anvil missing from ledger/node_modules (run `make node`)"
)
pytestmark = pytest.mark.anvil
module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def anvil() -> Iterator[AnvilNode]:
    if find_anvil() is None:
        pytest.skip("anvil missing from ledger/node_modules (run `make node`)")
    with run_anvil() as node:
        yield node


@pytest_asyncio.fixture(loop_scope="module", scope="module", params=["inprocess", "anvil"])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[LedgerClient]:
    backend = "inprocess"
    if request.param == "anvil":
        backend = request.getfixturevalue("anvil").url
    async with open_ledger(backend) as client:
        yield client


@module_loop
async def test_whole_flow(ledger: LedgerClient) -> None:
    world = await ledger_world(ledger, edges=2, devices=1, seed=7)
    edge, other, device = world.edges[0], world.edges[1], world.devices[0]
    results = [world.result(seq) for seq in range(6)]
    records = b"".join(r.task_id for r in results)  # stand-in bytes: the encoding is not parsed
    b0, tree0, r0 = await world.anchor(edge, results[:4], records)
    await world.anchor(edge, results[4:5])
    assert r0.gas_used > 21_000
    for seq in range(4):
        digest = results[seq].digest(ledger.domain)
        assert await ledger.verify_task(edge.address, b0, seq, digest, tree0.proof(seq))
    assert await ledger.batch_calldata(edge.address, b0) == records
    assert [e.batch_id for e in await ledger.batches(edge.address)] == [0, 1]
    # replayed, duplicated and out-of-order anchors revert
    state = await ledger.edge_state(edge.address)
    for batch_id, first_seq, prev, reason in [
        (0, 0, bytes(32), "BatchReplay"),
        (1, 4, r0.new_head, "BatchReplay"),
        (3, state.next_seq, state.head, "BatchGap"),
    ]:
        with pytest.raises(ContractRevertError) as info:
            await ledger.anchor_batch(edge, batch_id, tree0.root, first_seq, 1, prev, b"")
        assert info.value.reason == reason
    # an answered challenge and an omission (result 5 was never anchored)
    cid = await ledger.challenge(device, results[1], world.sign(edge, results[1]))
    await ledger.respond_challenge(edge, cid, b0, tree0.proof(1))
    missing = await ledger.challenge(device, results[5], world.sign(edge, results[5]))
    with pytest.raises(ContractRevertError, match="ChallengeWindowOpen"):
        await ledger.finalize_challenge(device, missing)
    await ledger.advance_time(await ledger.challenge_window() + 1)
    await ledger.finalize_challenge(device, missing)
    assert (await ledger.edge_state(edge.address)).omissions == 1
    # a device sent one task to two edges and they disagree
    evidence = world.redundant((edge, other), task=b"shared")
    did = await ledger.dispute(world.devices[0], evidence)
    assert (await ledger.dispute_info(did)).edges == 2


@needs_anvil
@module_loop
async def test_bind_existing_contract(anvil: AnvilNode) -> None:
    async with open_ledger(anvil.url) as first:
        address = first.address
    async with open_ledger(anvil.url, contract_address=address) as second:
        assert second.address == address
        assert await second.party_count() == 1  # the deployer's party
    with pytest.raises(ChainError, match="no contract"):
        async with open_ledger(anvil.url, contract_address="0x" + "42" * 20):
            pass


@needs_anvil
def test_cli_deploy_writes_a_deployment_that_reading_commands_take(
    anvil: AnvilNode, tmp_path: Path
) -> None:
    runner = CliRunner()
    key = tmp_path / "owner.key"
    key.write_text(anvil.keys[1] + "\n")
    out = tmp_path / "deployment.json"
    args = ["ledger", "deploy", "--rpc", anvil.url, "--key-file", str(key), "--out", str(out)]
    deployed = runner.invoke(app, args)
    assert deployed.exit_code == 0, deployed.output
    deployment = Deployment.from_json(out.read_bytes())
    assert deployment.chain_id == anvil.chain_id
    assert deployment.rpc == anvil.url
    assert f"contract {deployment.contract_text}" in deployed.output
    assert deployment.deployment_block >= 1
    again = runner.invoke(app, args)  # never overwritten
    assert isinstance(again.exception, ConfigError)
    assert out.read_bytes() == deployment.to_json().encode() + b"\n"
    shown = runner.invoke(app, ["ledger", "status", "--deployment", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.output)
    assert summary["chain_id"] == anvil.chain_id
    assert summary["owner"] == Account.from_key(anvil.keys[1]).address
    assert summary["edges"] == []
    text = runner.invoke(app, ["ledger", "status", "--deployment", str(out)])
    assert text.exit_code == 0
    assert f"contract: {deployment.contract_text}" in text.output
    # a reading command never deploys: no deployment and no contract is a usage error
    for reading in (
        ["ledger", "status", "--rpc", anvil.url],
        ["audit", "tasks", "--rpc", anvil.url],
    ):
        refused = runner.invoke(app, reading)
        assert isinstance(refused.exception, ConfigError), refused.output


@needs_anvil
def test_anvil_is_stopped_on_exit() -> None:
    with run_anvil() as node:
        assert node.process.poll() is None
    assert node.process.poll() is not None


def test_anvil_that_cannot_start_is_a_chain_error(tmp_path: Path) -> None:
    fake = tmp_path / "anvil"
    fake.write_text("#!/bin/sh\necho broken >&2\nexit 3\n")
    os.chmod(fake, 0o755)
    with pytest.raises(ChainError, match="exited with 3"), run_anvil(binary=fake):
        pass
    assert find_anvil(tmp_path) is None  # a ledger/ without node_modules
