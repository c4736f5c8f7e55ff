"""`secure-ci audit ...`: Audit tasks recorded on the ledger.

Records come from the calldata of the anchoring transactions of the deployment's contract
(``--deployment FILE``, or ``--rpc URL --contract ADDR``; never deployed here) into a local
index (``--index PATH``, kept between runs; in memory without it). ``tasks``, ``show`` and
``export`` work from the index alone; ``verify`` also needs the chain.

Every task carries its findings (one code and a message each: replayed-request,
device-not-registered, quote-id-mismatch, late-anchoring after ``--grace`` seconds,
request-chain-gap, challenge-equivocation, refusal-equivocation); a batch that cannot be
audited is a finding against its edge and the rest is audited. ``--receipts FILE`` (device
receipts, ``secure-ci device receipts --export``) adds receipt-equivocation on anchored
records and receipt-omission for receipts whose task was never anchored; a receipt whose
signatures do not verify is an error (exit 1), never a finding. ``verify --all`` exits 1 when
anything does not verify or has a finding. Task ids are scoped by device: ``--device`` picks
one device's task.
"""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from secure_ci.cli._audit_receipts import chain_time, load_receipts, omission_row
from secure_ci.exceptions import ConfigError, SecureCIError

app = typer.Typer(help="Audit tasks recorded on the ledger.", no_args_is_help=True)

Rpc = Annotated[
    str | None, typer.Option("--rpc", help="JSON-RPC URL (overrides the deployment's).")
]
Contract = Annotated[str | None, typer.Option("--contract", help="SecureCILedger address.")]
Index = Annotated[Path | None, typer.Option("--index", help="Local audit index (SQLite).")]
Grace = Annotated[
    int,
    typer.Option(
        "--grace",
        min=0,
        help="Seconds after a request's deadline its batch may be anchored (then: late-anchoring).",
    ),
]
Receipts = Annotated[
    Path | None,
    typer.Option(
        "--receipts",
        help="Device receipts file (`device receipts --export`): checked against the records.",
    ),
]
TaskDevice = Annotated[
    str | None, typer.Option("--device", help="Only this device's task (ids are per device).")
]
_GRACE = 3600


def _bytes(value: str | None, size: int, what: str) -> bytes | None:
    if value is None:
        return None
    try:
        raw = bytes.fromhex(value.removeprefix("0x"))
    except ValueError as exc:
        raise ConfigError(f"{what} must be hex") from exc
    if len(raw) != size:
        raise ConfigError(f"{what} must be {size} bytes")
    return raw


@asynccontextmanager
async def _opened(
    deployment: Path | None,
    rpc: str | None,
    contract: str | None,
    index: Path | None,
    grace: int = _GRACE,
    receipts: Path | None = None,
) -> AsyncIterator[Any]:
    """Yield (index, ledger or None), syncing the index from the chain when one is given and
    loading the verified ``receipts`` into it."""
    from secure_ci.cli._common import load_deployment
    from secure_ci.ledger._audit import AuditIndex
    from secure_ci.ledger._deployment import Deployment
    from secure_ci.ledger._records import LedgerDomain

    if deployment is None and rpc is None and contract is None:
        if index is None:
            raise ConfigError("give --deployment FILE (or --rpc URL --contract ADDR), or --index")
        with AuditIndex(index, grace_seconds=grace) as idx:
            load_receipts(idx, receipts)
            yield idx, None
        return
    from secure_ci.ledger import open_ledger

    found = load_deployment(deployment, rpc, contract)
    url, address, first = (
        (found.rpc, found.contract_text, found.deployment_block)
        if isinstance(found, Deployment)
        else (*found, 0)
    )
    async with open_ledger(url, contract_address=address) as ledger:
        if isinstance(found, Deployment) and ledger.chain_id != found.chain_id:
            raise ConfigError(f"the node runs chain {ledger.chain_id}, not the deployment's")
        domain = LedgerDomain(ledger.chain_id, bytes.fromhex(str(ledger.address)[2:]))
        with AuditIndex(
            index if index is not None else ":memory:", domain, grace_seconds=grace
        ) as idx:
            edges = {str(ev.edge) for ev in await ledger.batches(from_block=first)}
            await idx.sync(ledger, sorted(edges), from_block=first)
            load_receipts(idx, receipts)
            yield idx, ledger


Deployment = Annotated[
    Path | None,
    typer.Option("--deployment", help="Deployment file written by `secure-ci ledger deploy`."),
]


def _codes(row: dict[str, Any]) -> str:
    return " ".join(f["code"] for f in row["findings"])


def _batch_lines(idx: Any) -> list[str]:
    """One line per batch that could not be audited."""
    return [
        f"{f.code}  edge 0x{f.edge.hex()} batch {f.batch_id}: {f.message}"
        for f in idx.batch_findings()
    ]


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except SecureCIError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


@app.command()
def tasks(
    deployment: Deployment = None,
    rpc: Rpc = None,
    contract: Contract = None,
    index: Index = None,
    device: Annotated[str | None, typer.Option(help="Device address.")] = None,
    edge: Annotated[str | None, typer.Option(help="Edge (enclave key) address.")] = None,
    model: Annotated[str | None, typer.Option(help="Model id (32 bytes hex).")] = None,
    since: Annotated[int | None, typer.Option(help="Deadline >= this unix time.")] = None,
    until: Annotated[int | None, typer.Option(help="Deadline < this unix time.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many tasks.")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    grace: Grace = _GRACE,
) -> None:
    """List recorded tasks, filtered, with their findings."""

    async def go() -> tuple[list[dict[str, Any]], list[str]]:
        async with _opened(deployment, rpc, contract, index, grace) as (idx, _):
            found = idx.tasks(
                device=_bytes(device, 20, "--device"),
                edge=_bytes(edge, 20, "--edge"),
                model=_bytes(model, 32, "--model"),
                since=since,
                until=until,
                limit=limit,
            )
            return [t.as_json() for t in found], _batch_lines(idx)

    rows, bad = _run(go())
    for line in bad:
        sys.stderr.write(line + "\n")
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row, sort_keys=True) + "\n")
        return
    console = Console()
    for row in rows:
        findings = f"  findings {_codes(row)}" if row["findings"] else ""
        console.print(
            f"{row['task_id']}  edge {row['edge']}  seq {row['edge_seq']}  "
            f"device {row['device']}  status {row['status']}{findings}",
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"{len(rows)} task(s)", highlight=False)


@app.command()
def show(
    task: Annotated[str, typer.Argument(help="Task id (32 bytes hex).")],
    deployment: Deployment = None,
    rpc: Rpc = None,
    contract: Contract = None,
    index: Index = None,
    device: TaskDevice = None,
    grace: Grace = _GRACE,
) -> None:
    """Print every record of one task id as JSON, with its findings, device by device."""
    task_id = _bytes(task, 32, "TASK")
    device_id = _bytes(device, 20, "--device")

    async def go() -> list[dict[str, Any]]:
        async with _opened(deployment, rpc, contract, index, grace) as (idx, _):
            return [t.as_json() for t in idx.show(task_id or b"", device_id)]

    rows = _run(go())
    if not rows:
        raise SecureCIError(f"task {task} is not recorded" + (f" for {device}" if device else ""))
    _note_devices(task, rows)
    sys.stdout.write(json.dumps(rows, indent=2, sort_keys=True) + "\n")


def _note_devices(task: str | None, rows: list[dict[str, Any]]) -> None:
    """Say so when several devices use one task id: each (device, task id) is its own task."""
    devices = sorted({row["device"] for row in rows})
    if len(devices) > 1:
        sys.stderr.write(
            f"task id {task} is used by {len(devices)} devices, each its own task (listed"
            f" device by device; --device picks one): {', '.join(devices)}\n"
        )


@app.command()
def verify(
    task: Annotated[str | None, typer.Argument(help="Task id (32 bytes hex).")] = None,
    every: Annotated[bool, typer.Option("--all", help="Verify every recorded task.")] = False,
    deployment: Deployment = None,
    rpc: Rpc = None,
    contract: Contract = None,
    index: Index = None,
    device: TaskDevice = None,
    grace: Grace = _GRACE,
    receipts: Receipts = None,
) -> None:
    """Verify a task (or --all): leaf, proof against the chain, signatures, measurement, and
    report its findings.

    TASK: exit 1 if a record does not verify (or, with --receipts, a receipt's task was
    never anchored); its findings are in the JSON.
    --all: reports each failure, each finding (receipt omissions included) and each batch that
    could not be audited, and a summary, verifying everything else; exit 1 if there is any.
    """
    if (task is None) == (not every):
        raise ConfigError("give one TASK id, or --all")
    task_id = _bytes(task, 32, "TASK")
    device_id = _bytes(device, 20, "--device")
    if deployment is None and rpc is None:
        raise ConfigError("audit verify needs the chain: give --deployment FILE")
    if every:
        if device_id is not None:
            raise ConfigError("--device goes with one TASK id")
        summary = _run(_verify_all(deployment, rpc, contract, index, grace, receipts))
        sys.stdout.write(summary.line() + "\n")
        if not summary.clean:
            raise SecureCIError(summary.line())
        return

    async def go() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with _opened(deployment, rpc, contract, index, grace, receipts) as (idx, ledger):
            omitted = [
                {
                    "task_id": task,
                    "device": "0x" + r.request.device.hex(),
                    "edge": "0x" + r.edge.hex(),
                    "seq": r.result.edge_seq,
                    "verified": False,
                    "findings": [{"code": str(f.code), "message": f.message}],
                }
                for r, f in idx.receipt_omissions(await chain_time(idx, ledger))
                if r.request.task_id == task_id and device_id in (None, r.request.device)
            ]
            if omitted and not idx.show(task_id or b"", device_id):
                return omitted, []
            verified = await idx.verify(task_id or b"", ledger, device_id)
            return omitted, [
                {
                    "task_id": task,
                    "device": "0x" + v.task.record.request.device.hex(),
                    "edge": "0x" + v.task.edge.hex(),
                    "batch_id": v.task.batch_id,
                    "record_hash": "0x" + v.record_hash.hex(),
                    "root": "0x" + v.root.hex(),
                    "proof": ["0x" + p.hex() for p in v.proof],
                    "verified": True,
                    "findings": [{"code": str(f.code), "message": f.message} for f in v.findings],
                }
                for v in verified
            ]

    omitted, rows = _run(go())
    rows += omitted
    _note_devices(task, rows)
    sys.stdout.write(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    if omitted:
        raise SecureCIError(f"task {task} has a device receipt but was never anchored")


@dataclass(frozen=True)
class _Summary:
    total: int
    failures: int
    findings: int
    flagged: int
    bad_batches: int

    @property
    def clean(self) -> bool:
        return not (self.failures or self.findings or self.bad_batches)

    def line(self) -> str:
        return (
            f"{self.total - self.failures} of {self.total} tasks verified; {self.findings}"
            f" finding(s) on {self.flagged} task(s); {self.bad_batches} batch(es) not audited"
        )


async def _verify_all(
    deployment: Path | None,
    rpc: str | None,
    contract: str | None,
    index: Path | None,
    grace: int,
    receipts: Path | None = None,
) -> _Summary:
    """Verify every indexed task against the roots just read from the chain (one pass);
    print each failure (stderr) and each finding (stdout), then each receipt omission."""
    from rich.progress import Progress

    failures = findings = flagged = 0
    async with _opened(deployment, rpc, contract, index, grace, receipts) as (idx, ledger):
        bad = _batch_lines(idx)
        for line in bad:
            sys.stdout.write(line + "\n")
        tasks = idx.tasks(limit=1 << 62)
        with Progress(console=Console(stderr=True), transient=True) as progress:
            bar = progress.add_task("verifying", total=len(tasks))
            for t in tasks:
                where = (
                    f"task 0x{t.record.request.task_id.hex()} device"
                    f" 0x{t.record.request.device.hex()} (edge 0x{t.edge.hex()} seq"
                    f" {t.record.result.edge_seq})"
                )
                found = t.findings  # as listed; a task that fails still shows them
                try:
                    found = (await idx.verify_task(t, None)).findings
                except SecureCIError as exc:
                    failures += 1
                    sys.stderr.write(f"{where}: {exc}\n")
                for f in found:
                    sys.stdout.write(f"{f.code}  {where}: {f.message}\n")
                findings += len(found)
                flagged += bool(found)
                progress.advance(bar)
        for r, f in idx.receipt_omissions(await chain_time(idx, ledger)):
            sys.stdout.write(
                f"{f.code}  task 0x{r.request.task_id.hex()} device 0x{r.request.device.hex()}"
                f" (edge 0x{f.edge.hex()} seq {f.seq}): {f.message}\n"
            )
            findings += 1
            flagged += 1
    return _Summary(len(tasks), failures, findings, flagged, len(bad))


@app.command()
def export(
    deployment: Deployment = None,
    rpc: Rpc = None,
    contract: Contract = None,
    index: Index = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    limit: Annotated[int, typer.Option(help="At most this many tasks.")] = 10_000_000,
    grace: Grace = _GRACE,
    receipts: Receipts = None,
) -> None:
    """Write every indexed task to stdout as JSON lines or CSV, with its findings.

    JSON: ``findings`` is a list of {code, message}; CSV: ``findings`` holds the codes
    (space-separated) and ``finding_messages`` the messages (" | "-separated). Batches that
    could not be audited are listed on stderr. With --receipts, a receipt whose task was
    never anchored is a row of its own (``batch_id`` -1, finding receipt-omission).
    """
    if fmt not in ("jsonl", "csv"):
        raise ConfigError("--format must be jsonl or csv")

    async def go() -> tuple[list[dict[str, Any]], list[str]]:
        async with _opened(deployment, rpc, contract, index, grace, receipts) as (idx, ledger):
            rows = [t.as_json() for t in idx.tasks(limit=limit)]
            omitted = idx.receipt_omissions(await chain_time(idx, ledger))
            return rows + [omission_row(r, f) for r, f in omitted], _batch_lines(idx)

    rows, bad = _run(go())
    for line in bad:
        sys.stderr.write(line + "\n")
    if fmt == "jsonl":
        for row in rows:
            sys.stdout.write(json.dumps(row, sort_keys=True) + "\n")
        return
    for row in rows:
        row["finding_messages"] = " | ".join(f["message"] for f in row["findings"])
        row["findings"] = _codes(row)
    if rows:
        writer = csv.DictWriter(sys.stdout, fieldnames=sorted(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
