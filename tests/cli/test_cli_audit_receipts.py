"""`secure-ci audit verify|export --receipts FILE` and equivocation findings: an edge that
anchors another result than it signed to a challenger, or refuses a request it answered, or
whose device receipt differs from the anchored record or was never anchored; hostile receipts
files are errors (exit 1) that name what is wrong, never findings."""

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

from secure_ci.cli import app, exit_code
from secure_ci.ledger import LedgerClient, find_anvil, open_ledger, run_anvil
from secure_ci.ledger._audit import AuditIndex
from secure_ci.ledger._audit_receipts import DeviceReceipt, encode_receipts
from secure_ci.ledger._calldata import AnchoredRecord, BatchRecords, encode_batch
from secure_ci.ledger._integrity import REFUSAL_NOT_RECEIVED, refusal_digest
from secure_ci.ledger._records import (
    LedgerDomain,
    TaskRequest,
    TaskResult,
    keccak256,
    sign_digest,
    task_id_for,
)
from secure_ci.testing import LedgerWorld, ledger_world

runner = CliRunner()


@dataclass(frozen=True)
class Signed:
    request: TaskRequest
    device_sig: bytes
    result: TaskResult
    edge_sig: bytes

    def receipt(self) -> DeviceReceipt:
        return DeviceReceipt(self.request, self.result, self.device_sig, self.edge_sig)


@dataclass(frozen=True)
class Built:
    domain: LedgerDomain
    edges: tuple[str, str]
    challenged: Signed  # anchored: another result than the one shown to a challenger
    refused: Signed  # anchored, then refused as never received
    differs: Signed  # anchored: another result than the device's receipt
    receipts: tuple[DeviceReceipt, ...]  # honest ones, one that differs, one never anchored
    missing: Signed
    forged: DeviceReceipt


def _sign(
    world: LedgerWorld, device: LocalAccount, edge: LocalAccount, n: int, seq: int,
    deadline: int, output: bytes = b"out",
) -> Signed:  # fmt: skip
    dev, edge_b = bytes.fromhex(device.address[2:]), bytes.fromhex(edge.address[2:])
    input_c = keccak256(b"cli input" + n.to_bytes(4, "big"))
    request = TaskRequest(
        task_id_for(dev, input_c), dev, n, keccak256(b"model"), 3, input_c, edge_b, deadline
    )
    result = TaskResult(
        request.task_id, request.struct_hash(), keccak256(output), world.measurement,
        world.quote_id, 0, 7, seq,
    )  # fmt: skip
    domain = world.ledger.domain
    return Signed(
        request, request.sign(bytes(device.key), domain), result, world.sign(edge, result)
    )


async def _anchor(world: LedgerWorld, edge: LocalAccount, signed: list[Signed]) -> None:
    state = await world.ledger.edge_state(edge.address)
    records = tuple(AnchoredRecord(s.request, s.result, s.device_sig) for s in signed)
    edge_b = bytes.fromhex(edge.address[2:])
    data = encode_batch(BatchRecords(edge_b, state.next_seq, records))
    tree = world.tree([r.result for r in records])
    await world.ledger.anchor_batch(
        edge, state.next_batch_id, tree.root, state.next_seq, len(records), state.head, data
    )


async def _build(ledger: LedgerClient) -> Built:
    world = await ledger_world(ledger, edges=2, devices=2, seed=11)
    edge0, edge1 = world.edges
    a, b = world.devices
    soon = await ledger.timestamp() + 60
    honest = _sign(world, a, edge0, 1, 0, soon)
    challenged = _sign(world, a, edge0, 2, 1, soon, output=b"anchored")
    shown = _sign(world, a, edge0, 2, 1, soon, output=b"shown to the challenger")
    refused = _sign(world, b, edge0, 3, 2, soon)
    differs = _sign(world, b, edge1, 4, 0, soon, output=b"anchored")
    kept = _sign(world, b, edge1, 4, 0, soon, output=b"what the device got")
    missing = _sign(world, a, edge1, 5, 1, soon)
    await _anchor(world, edge0, [honest, challenged, refused])
    await _anchor(world, edge1, [differs])
    await ledger.challenge(a, shown.result, shown.edge_sig)
    challenge_id = await ledger.challenge_request(b, refused.request, refused.device_sig)
    digest = refusal_digest(ledger.domain, refused.request.struct_hash(), REFUSAL_NOT_RECEIVED)
    await ledger.refuse_request(
        edge0, challenge_id, REFUSAL_NOT_RECEIVED, sign_digest(bytes(edge0.key), digest)
    )
    # the window of the missing task passes; edge0 anchors one more (the index's latest time)
    await ledger.advance_time(4000)
    await _anchor(world, edge0, [_sign(world, a, edge0, 6, 3, soon + 10**6)])
    framed = TaskResult(
        honest.result.task_id, honest.result.request_hash, keccak256(b"framed"),
        world.measurement, world.quote_id, 0, 7, 0,
    )  # fmt: skip
    forged = DeviceReceipt(
        honest.request, framed, honest.device_sig, framed.sign(bytes(edge1.key), ledger.domain)
    )
    return Built(
        ledger.domain, (edge0.address, edge1.address), challenged, refused, differs,
        (honest.receipt(), kept.receipt(), missing.receipt()), missing, forged,
    )  # fmt: skip


def _indexed(tmp_path: Path) -> tuple[Path, Path, Built]:
    async def go() -> Built:
        async with open_ledger("inprocess") as ledger:
            built = await _build(ledger)
            with AuditIndex(tmp_path / "index.db", ledger.domain) as index:
                await index.sync(ledger, list(built.edges))
            return built

    built = asyncio.run(go())
    receipts = tmp_path / "receipts.json"
    receipts.write_bytes(encode_receipts(built.domain, built.receipts))
    return tmp_path / "index.db", receipts, built


def _invoke(*args: str) -> Any:
    return runner.invoke(app, ["audit", *args])


def _refused(*args: str) -> tuple[int, str]:
    """The exit code and message `secure-ci` gives for a command that fails (as ``main``)."""
    result = _invoke(*args)
    assert result.exception is not None, result.output
    assert result.stdout == ""  # nothing is reported from a file that does not verify
    return exit_code(result.exception), str(result.exception)


def _key(s: Signed) -> tuple[str, int]:
    return "0x" + s.request.task_id.hex(), s.result.edge_seq


def test_export_reports_equivocations_and_omissions(tmp_path: Path) -> None:
    index, receipts, built = _indexed(tmp_path)
    # without receipts: the chain's challenge and refusal equivocations
    result = _invoke("export", "--index", str(index))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    codes = {(r["task_id"], r["edge_seq"]): [f["code"] for f in r["findings"]] for r in rows}
    assert codes[_key(built.challenged)] == ["challenge-equivocation"]
    assert codes[_key(built.refused)] == ["refusal-equivocation"]
    assert codes[_key(built.differs)] == []
    assert sum(bool(c) for c in codes.values()) == 2
    # with receipts: the receipt that differs, and a row for the task never anchored
    result = _invoke("export", "--index", str(index), "--receipts", str(receipts))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    codes = {(r["task_id"], r["edge_seq"]): [f["code"] for f in r["findings"]] for r in rows}
    assert codes[_key(built.differs)] == ["receipt-equivocation"]
    assert codes[_key(built.missing)] == ["receipt-omission"]
    (omitted,) = [r for r in rows if r["batch_id"] == -1]
    assert omitted["edge"] == built.edges[1].lower()
    assert set(omitted) == set(rows[0])
    assert sum(bool(c) for c in codes.values()) == 4
    result = _invoke(
        "export", "--index", str(index), "--receipts", str(receipts), "--format", "csv"
    )
    assert result.exit_code == 0, result.output
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {r["findings"] for r in table} == {
        "", "challenge-equivocation", "refusal-equivocation", "receipt-equivocation",
        "receipt-omission",
    }  # fmt: skip


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_hostile_receipts_files_are_errors(tmp_path: Path) -> None:
    index, _receipts, built = _indexed(tmp_path)
    forged = encode_receipts(built.domain, [*built.receipts, built.forged])
    cases = {
        "forged.json": (forged, "receipt 3: the result is not signed by the request's edge"),
        "empty.json": (b"", "not JSON"),
        "deep.json": (b"[" * 200_000, "nests deeper"),
        "list.json": (b"[]", "must be a JSON object"),
        "other.json": (
            encode_receipts(LedgerDomain(1, built.domain.contract), []),
            "not the audited chain",
        ),
    }
    for name, (data, message) in cases.items():
        code, said = _refused(
            "export", "--index", str(index), "--receipts", _write(tmp_path / name, data)
        )
        assert code == 1, (name, said)
        assert message in said, (name, said)
        assert said.startswith(f"receipts file {tmp_path / name}: ")
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate((64 << 20) + 10)
    code, said = _refused("export", "--index", str(index), "--receipts", str(big))
    assert (code, "larger than" in said) == (1, True)
    code, said = _refused("export", "--index", str(index), "--receipts", str(tmp_path / "none"))
    assert (code, "cannot read receipts file" in said) == (2, True)


@pytest.mark.anvil
def test_verify_reports_receipt_and_challenge_findings(tmp_path: Path) -> None:
    if find_anvil() is None:
        pytest.skip("anvil is not installed (npm ci in ledger/)")
    with run_anvil() as node:

        async def setup() -> tuple[str, Built]:
            async with open_ledger(node.url, deployer=Account.from_key(node.keys[0])) as ledger:
                return str(ledger.address), await _build(ledger)

        address, built = asyncio.run(setup())
        receipts = _write(tmp_path / "r.json", encode_receipts(built.domain, built.receipts))
        chain = ["--rpc", node.url, "--contract", address]
        result = _invoke("verify", "--all", *chain)
        assert result.exit_code == 1
        lines = result.stdout.splitlines()
        assert sum(line.startswith("challenge-equivocation  task") for line in lines) == 1
        assert sum(line.startswith("refusal-equivocation  task") for line in lines) == 1
        assert (
            lines[-1] == "5 of 5 tasks verified; 2 finding(s) on 2 task(s); 0 batch(es) not audited"
        )
        result = _invoke("verify", "--all", *chain, "--receipts", receipts)
        assert result.exit_code == 1
        lines = result.stdout.splitlines()
        assert sum(line.startswith("receipt-equivocation  task") for line in lines) == 1
        (omission,) = [line for line in lines if line.startswith("receipt-omission  task")]
        assert f"0x{built.missing.request.task_id.hex()}" in omission
        assert (
            lines[-1] == "5 of 5 tasks verified; 4 finding(s) on 4 task(s); 0 batch(es) not audited"
        )
        # one task: an equivocation is a finding of a record that verifies (exit 0) ...
        result = _invoke(
            "verify", built.differs.request.task_id.hex(), *chain, "--receipts", receipts
        )
        assert result.exit_code == 0, result.output
        (row,) = json.loads(result.stdout)
        assert [f["code"] for f in row["findings"]] == ["receipt-equivocation"]
        # ... a receipt's task never anchored is not verified (exit 1), its omission shown
        task = built.missing.request.task_id.hex()
        result = _invoke("verify", task, *chain, "--receipts", receipts)
        assert result.exit_code == 1
        (row,) = json.loads(result.stdout)
        assert row["verified"] is False
        assert [f["code"] for f in row["findings"]] == ["receipt-omission"]
        forged = encode_receipts(built.domain, [built.forged])
        code, said = _refused(
            "verify", "--all", *chain, "--receipts", _write(tmp_path / "f", forged)
        )
        assert (code, "forged receipt" in said) == (1, True)


def test_device_receipts_export_is_what_audit_reads(tmp_path: Path) -> None:
    """`device receipts --export` writes the journal's signed receipts (never the salts) in
    the file `audit --receipts` reads."""
    from secure_ci.device._journal import DeviceJournal
    from secure_ci.device._tasks import TaskReceipt
    from secure_ci.ledger._audit_receipts import parse_receipts

    index, _receipts, built = _indexed(tmp_path)
    journal = tmp_path / "device.db"
    salts = [bytes([i + 1]) * 32 for i in range(len(built.receipts))]
    with DeviceJournal.open(journal) as book:
        for r, salt in zip(built.receipts, salts, strict=True):
            book.record(
                TaskReceipt(r.request, r.result, r.device_sig, r.edge_sig, salt, salt, built.domain)
            )
    out = tmp_path / "exported.json"
    result = runner.invoke(
        app, ["device", "receipts", "--journal", str(journal), "--export", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert all(salt.hex() not in data.decode() for salt in salts)
    assert sorted(parse_receipts(data, built.domain), key=lambda r: r.result.edge_seq) == sorted(
        built.receipts, key=lambda r: r.result.edge_seq
    )
    result = _invoke("export", "--index", str(index), "--receipts", str(out))
    assert result.exit_code == 0, result.output
    assert "receipt-omission" in result.stdout
