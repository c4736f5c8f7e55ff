"""`secure-ci audit` reports findings: per task (tasks, show, verify, export) and per batch that
could not be audited, which blocks nothing else; `verify` exits 1 when there are any."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from typer.testing import CliRunner

from secure_ci.cli import app
from secure_ci.cli._audit import _GRACE
from secure_ci.exceptions import ConfigError
from secure_ci.ledger import LedgerClient, find_anvil, open_ledger, run_anvil
from secure_ci.ledger._audit import AuditIndex
from secure_ci.ledger._calldata import AnchoredRecord, BatchRecords, encode_batch
from secure_ci.ledger._findings import DEFAULT_GRACE_SECONDS
from secure_ci.ledger._records import TaskRequest, TaskResult, keccak256, task_id_for
from secure_ci.testing import LedgerWorld, ledger_world

runner = CliRunner()


@dataclass(frozen=True)
class Built:
    """What the chain holds: an honest task, a replayed one, an unregistered device's, a task
    id two devices use, and one malformed batch between them."""

    honest: bytes
    replayed: bytes
    stranger: bytes
    shared: bytes
    devices: tuple[bytes, bytes]
    edges: tuple[str, str]


def _request(
    world: LedgerWorld, signer: LocalAccount, edge: LocalAccount, n: int, deadline: int,
    task_id: bytes | None = None,
) -> tuple[TaskRequest, bytes]:  # fmt: skip
    device = bytes.fromhex(signer.address[2:])
    input_c = keccak256(b"input" + n.to_bytes(4, "big"))
    request = TaskRequest(
        task_id or task_id_for(device, input_c), device, n, keccak256(b"model"), 3, input_c,
        bytes.fromhex(edge.address[2:]), deadline,
    )  # fmt: skip
    return request, request.sign(bytes(signer.key), world.ledger.domain)


async def _anchor(
    world: LedgerWorld, edge: LocalAccount, items: list[tuple[TaskRequest, bytes, bytes]],
    calldata: bytes | None = None,
) -> None:  # fmt: skip
    state = await world.ledger.edge_state(edge.address)
    results = [
        TaskResult(
            r.task_id, r.struct_hash(), keccak256(out), world.measurement, world.quote_id, 0, 7, seq
        )
        for seq, (r, _sig, out) in enumerate(items, start=state.next_seq)
    ]
    records = [
        AnchoredRecord(request, result, sig)
        for (request, sig, _out), result in zip(items, results, strict=True)
    ]
    data = encode_batch(
        BatchRecords(bytes.fromhex(edge.address[2:]), state.next_seq, tuple(records))
    )
    tree = world.tree([r.result for r in records])
    await world.ledger.anchor_batch(
        edge, state.next_batch_id, tree.root, state.next_seq, len(records), state.head,
        data if calldata is None else calldata,
    )  # fmt: skip


async def _build(ledger: LedgerClient) -> Built:
    world = await ledger_world(ledger, edges=2, devices=2, seed=3)
    edge0, edge1 = world.edges
    a, b = world.devices
    stranger = Account.from_key(keccak256(b"unregistered device"))
    deadline = await ledger.timestamp() + 3600
    honest = _request(world, a, edge0, 1, deadline)
    replayed = _request(world, a, edge0, 2, deadline)
    alien = _request(world, stranger, edge1, 1, deadline)
    shared = keccak256(b"shared task id")
    shared_a = _request(world, a, edge1, 3, deadline, task_id=shared)
    shared_b = _request(world, b, edge1, 3, deadline, task_id=shared)
    await _anchor(world, edge0, [(*honest, b"o"), (*replayed, b"o")])
    await _anchor(world, edge0, [(*honest, b"x")], calldata=b"\x02 not a batch")
    await _anchor(world, edge0, [(*replayed, b"another output")])
    await _anchor(world, edge1, [(*alien, b"o"), (*shared_a, b"o"), (*shared_b, b"o")])
    return Built(
        honest[0].task_id, replayed[0].task_id, alien[0].task_id, shared,
        (shared_a[0].device, shared_b[0].device), (edge0.address, edge1.address),
    )  # fmt: skip


def _indexed(tmp_path: Path) -> tuple[Path, Built]:
    """An index file of the in-process chain (the CLI reads it without a node)."""

    async def go() -> Built:
        async with open_ledger("inprocess") as ledger:
            built = await _build(ledger)
            with AuditIndex(tmp_path / "index.db", ledger.domain) as index:
                await index.sync(ledger, list(built.edges))
            return built

    return tmp_path / "index.db", asyncio.run(go())


def _invoke(*args: str) -> Any:
    return runner.invoke(app, ["audit", *args])


def test_the_cli_and_the_library_agree_on_the_default_grace() -> None:
    assert _GRACE == DEFAULT_GRACE_SECONDS


def test_tasks_show_export_carry_findings(tmp_path: Path) -> None:
    index, built = _indexed(tmp_path)
    result = _invoke("tasks", "--index", str(index), "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 6  # the malformed batch's record is not among them
    codes = {(r["task_id"], r["edge_seq"]): [f["code"] for f in r["findings"]] for r in rows}
    assert codes[("0x" + built.honest.hex(), 0)] == []
    assert codes[("0x" + built.replayed.hex(), 1)] == ["replayed-request"]
    assert codes[("0x" + built.replayed.hex(), 3)] == ["replayed-request"]
    assert codes[("0x" + built.stranger.hex(), 0)] == ["device-not-registered"]
    assert "batch-malformed" in result.stderr
    human = _invoke("tasks", "--index", str(index))
    assert "findings device-not-registered" in human.stdout
    assert "6 task(s)" in human.stdout

    result = _invoke("show", built.shared.hex(), "--index", str(index))
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert [r["device"] for r in shown] == ["0x" + d.hex() for d in sorted(built.devices)]
    assert all(r["findings"] == [] for r in shown)
    assert "used by 2 devices" in result.stderr
    device = "0x" + built.devices[1].hex()
    result = _invoke("show", built.shared.hex(), "--index", str(index), "--device", device)
    (only,) = json.loads(result.stdout)
    assert only["device"] == device
    assert result.stderr == ""
    missing = _invoke("show", built.shared.hex(), "--index", str(index), "--device", "00" * 20)
    assert missing.exit_code == 1

    result = _invoke("export", "--index", str(index), "--format", "csv")
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    flagged = {r["findings"] for r in table}
    assert flagged == {"", "replayed-request", "device-not-registered"}
    assert any("was never registered" in r["finding_messages"] for r in table)
    result = _invoke("export", "--index", str(index), "--grace", "0")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 6


@pytest.mark.anvil
def test_verify_reports_findings_and_exits_1(tmp_path: Path) -> None:
    if find_anvil() is None:
        pytest.skip("anvil is not installed (npm ci in ledger/)")
    with run_anvil() as node:

        async def setup() -> tuple[str, Built]:
            async with open_ledger(node.url, deployer=Account.from_key(node.keys[0])) as ledger:
                return str(ledger.address), await _build(ledger)

        address, built = asyncio.run(setup())
        chain = ["--rpc", node.url, "--contract", address]
        result = _invoke("verify", "--all", *chain)
        assert result.exit_code == 1
        lines = result.stdout.splitlines()
        assert any(line.startswith("batch-malformed  edge") for line in lines)
        assert sum(line.startswith("replayed-request  task") for line in lines) == 2
        assert sum(line.startswith("device-not-registered  task") for line in lines) == 1
        assert lines[-1] == (
            "6 of 6 tasks verified; 3 finding(s) on 3 task(s); 1 batch(es) not audited"
        )
        result = _invoke("verify", built.honest.hex(), *chain)
        assert result.exit_code == 0, result.output
        (verified,) = json.loads(result.stdout)
        assert verified["findings"] == []
        result = _invoke("verify", built.replayed.hex(), *chain)
        assert result.exit_code == 0, result.output  # it verifies; its findings are reported
        records = json.loads(result.stdout)
        assert [r["findings"][0]["code"] for r in records] == ["replayed-request"] * 2
        device = "0x" + built.devices[0].hex()
        result = _invoke("verify", built.shared.hex(), *chain, "--device", device)
        assert result.exit_code == 0, result.output
        assert [r["device"] for r in json.loads(result.stdout)] == [device]
        # a kept index resumes; its findings stay; --device goes with one task
        kept = ["--index", str(tmp_path / "kept.db")]
        assert _invoke("verify", "--all", *chain, *kept).exit_code == 1
        again = _invoke("verify", "--all", *chain, *kept)
        assert again.stdout.splitlines()[-1] == lines[-1]
        usage = _invoke("verify", "--all", *chain, "--device", device)
        assert isinstance(usage.exception, ConfigError)
