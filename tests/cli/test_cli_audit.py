"""`secure-ci audit ...` on an index file, and `audit verify` against a real chain (anvil)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import pytest
from eth_account import Account
from typer.testing import CliRunner

from secure_ci.cli import app
from secure_ci.exceptions import ConfigError
from secure_ci.ledger._anchor import Anchorer
from secure_ci.ledger._audit import AuditIndex
from secure_ci.ledger._journal import Journal
from secure_ci.ledger._records import keccak256
from secure_ci.testing import MemoryLedger, sample_tasks

runner = CliRunner()
EDGE_KEY = keccak256(b"edge")
EDGE = Account.from_key(EDGE_KEY)


def _index(tmp_path: Path) -> tuple[Path, list[bytes]]:
    async def build() -> list[bytes]:
        ledger = MemoryLedger()
        ledger.register_edge(EDGE, b"\x11" * 32)
        with Journal.open(tmp_path / "edge.db", edge=bytes.fromhex(EDGE.address[2:])) as j:
            entries = sample_tasks(9, edge_key=EDGE_KEY, domain=ledger.domain)
            j.append_many(entries)
            await Anchorer(j, ledger, EDGE, max_records=8).flush()  # signatures left out
        with AuditIndex(tmp_path / "index.db", ledger.domain) as index:
            await index.sync(ledger, [EDGE.address])
        return [e.request.task_id for e in entries]

    return tmp_path / "index.db", asyncio.run(build())


def test_tasks_show_export_from_an_index(tmp_path: Path) -> None:
    index, task_ids = _index(tmp_path)
    result = runner.invoke(app, ["audit", "tasks", "--index", str(index), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["task_id"] for r in rows] == ["0x" + t.hex() for t in task_ids]
    device = rows[1]["device"]
    result = runner.invoke(app, ["audit", "tasks", "--index", str(index), "--device", device])
    assert result.exit_code == 0
    assert "2 task(s)" in result.output
    result = runner.invoke(app, ["audit", "show", task_ids[4].hex(), "--index", str(index)])
    assert result.exit_code == 0
    assert json.loads(result.output)[0]["edge_seq"] == 4
    result = runner.invoke(app, ["audit", "export", "--index", str(index), "--format", "csv"])
    assert result.exit_code == 0
    assert len(list(csv.DictReader(io.StringIO(result.output)))) == 9


def test_usage_errors(tmp_path: Path) -> None:
    index, task_ids = _index(tmp_path)
    for args in (
        ["audit", "tasks"],
        ["audit", "verify", task_ids[0].hex(), "--index", str(index)],
        ["audit", "export", "--index", str(index), "--format", "xml"],
        ["audit", "show", "zz", "--index", str(index)],
    ):
        result = runner.invoke(app, args)
        assert isinstance(result.exception, ConfigError), args


@pytest.mark.anvil
def test_verify_against_anvil(tmp_path: Path) -> None:
    import secure_ci.ledger as ledger_mod

    if ledger_mod.find_anvil() is None:
        pytest.skip("anvil is not installed (npm ci in ledger/)")
    with ledger_mod.run_anvil() as node:
        owner, admin = (Account.from_key(k) for k in node.keys[:2])

        async def setup() -> tuple[str, bytes]:
            async with ledger_mod.open_ledger(node.url, deployer=owner) as ledger:
                await ledger.fund(EDGE.address, 10**20)
                party = await ledger.register_party(admin.address)
                await ledger.allow_measurement(b"\x11" * 32)
                await ledger.register_edge(admin, party, EDGE, b"\x11" * 32, b"\x22" * 32, "e:1")
                entries = sample_tasks(5, edge_key=EDGE_KEY, domain=ledger.domain)
                with Journal.open(tmp_path / "e.db", edge=bytes.fromhex(EDGE.address[2:])) as j:
                    j.append_many(entries)
                    await Anchorer(j, ledger, EDGE, max_records=2).flush()
                return str(ledger.address), entries[3].request.task_id

        address, task_id = asyncio.run(setup())
        args = ["--rpc", node.url, "--contract", address]
        result = runner.invoke(app, ["audit", "verify", task_id.hex(), *args])
        assert result.exit_code == 0, result.output
        (verified,) = json.loads(result.output)
        assert verified["verified"] is True
        assert verified["batch_id"] == 1
        unknown = runner.invoke(app, ["audit", "verify", "00" * 32, *args])
        assert unknown.exit_code != 0
