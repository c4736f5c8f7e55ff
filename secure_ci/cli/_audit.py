"""`secure-ci audit ...`: Audit tasks recorded on the ledger.

Records come from the calldata of the anchoring transactions of the deployment's contract
(``--deployment FILE``, or ``--rpc URL --contract ADDR``; never deployed here) into a local
index (``--index PATH``, kept between runs; in memory without it). ``tasks``, ``show`` and
``export`` work from the index alone; ``verify`` also needs the chain.
"""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from secure_ci.exceptions import ConfigError, SecureCIError

app = typer.Typer(help="Audit tasks recorded on the ledger.", no_args_is_help=True)

Rpc = Annotated[
    str | None, typer.Option("--rpc", help="JSON-RPC URL (overrides the deployment's).")
]
Contract = Annotated[str | None, typer.Option("--contract", help="SecureCILedger address.")]
Index = Annotated[Path | None, typer.Option("--index", help="Local audit index (SQLite).")]


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
    deployment: Path | None, rpc: str | None, contract: str | None, index: Path | None
) -> AsyncIterator[Any]:
    """Yield (index, ledger or None), syncing the index from the chain when one is given."""
    from secure_ci.cli._common import load_deployment
    from secure_ci.ledger._audit import AuditIndex
    from secure_ci.ledger._deployment import Deployment
    from secure_ci.ledger._records import LedgerDomain

    if deployment is None and rpc is None and contract is None:
        if index is None:
            raise ConfigError("give --deployment FILE (or --rpc URL --contract ADDR), or --index")
        with AuditIndex(index) as idx:
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
        with AuditIndex(index if index is not None else ":memory:", domain) as idx:
            edges = {str(ev.edge) for ev in await ledger.batches(from_block=first)}
            await idx.sync(ledger, sorted(edges))
            yield idx, ledger


Deployment = Annotated[
    Path | None,
    typer.Option("--deployment", help="Deployment file written by `secure-ci ledger deploy`."),
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
) -> None:
    """List recorded tasks, filtered."""

    async def go() -> list[dict[str, Any]]:
        async with _opened(deployment, rpc, contract, index) as (idx, _):
            found = idx.tasks(
                device=_bytes(device, 20, "--device"),
                edge=_bytes(edge, 20, "--edge"),
                model=_bytes(model, 32, "--model"),
                since=since,
                until=until,
                limit=limit,
            )
            return [t.as_json() for t in found]

    rows = _run(go())
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row, sort_keys=True) + "\n")
        return
    console = Console()
    for row in rows:
        console.print(
            f"{row['task_id']}  edge {row['edge']}  seq {row['edge_seq']}  "
            f"device {row['device']}  status {row['status']}",
            highlight=False,
        )
    console.print(f"{len(rows)} task(s)", highlight=False)


@app.command()
def show(
    task: Annotated[str, typer.Argument(help="Task id (32 bytes hex).")],
    deployment: Deployment = None,
    rpc: Rpc = None,
    contract: Contract = None,
    index: Index = None,
) -> None:
    """Print every record of one task as JSON."""
    task_id = _bytes(task, 32, "TASK")

    async def go() -> list[dict[str, Any]]:
        async with _opened(deployment, rpc, contract, index) as (idx, _):
            return [t.as_json() for t in idx.show(task_id or b"")]

    rows = _run(go())
    if not rows:
        raise SecureCIError(f"task {task} is not recorded")
    sys.stdout.write(json.dumps(rows, indent=2, sort_keys=True) + "\n")


@app.command()
def verify(
    task: Annotated[str | None, typer.Argument(help="Task id (32 bytes hex).")] = None,
    every: Annotated[bool, typer.Option("--all", help="Verify every recorded task.")] = False,
    deployment: Deployment = None,
    rpc: Rpc = None,
    contract: Contract = None,
    index: Index = None,
) -> None:
    """Verify a task (or --all): leaf, proof against the chain, signatures, measurement.

    Exit 1 if any record does not verify; --all reports each failure and a summary.
    """
    if (task is None) == (not every):
        raise ConfigError("give one TASK id, or --all")
    task_id = _bytes(task, 32, "TASK")
    if deployment is None and rpc is None:
        raise ConfigError("audit verify needs the chain: give --deployment FILE")
    if every:
        failures, total = _run(_verify_all(deployment, rpc, contract, index))
        sys.stdout.write(f"{total - failures} of {total} tasks verified\n")
        if failures:
            raise SecureCIError(f"{failures} of {total} tasks do not verify")
        return

    async def go() -> list[dict[str, Any]]:
        async with _opened(deployment, rpc, contract, index) as (idx, ledger):
            verified = await idx.verify(task_id or b"", ledger)
            return [
                {
                    "task_id": task,
                    "edge": "0x" + v.task.edge.hex(),
                    "batch_id": v.task.batch_id,
                    "record_hash": "0x" + v.record_hash.hex(),
                    "root": "0x" + v.root.hex(),
                    "proof": ["0x" + p.hex() for p in v.proof],
                    "verified": True,
                }
                for v in verified
            ]

    sys.stdout.write(json.dumps(_run(go()), indent=2, sort_keys=True) + "\n")


async def _verify_all(
    deployment: Path | None, rpc: str | None, contract: str | None, index: Path | None
) -> tuple[int, int]:
    """Verify every indexed task against the roots just read from the chain (one pass)."""
    from rich.progress import Progress

    failures = 0
    async with _opened(deployment, rpc, contract, index) as (idx, _):
        tasks = idx.tasks(limit=1 << 62)
        with Progress(console=Console(stderr=True), transient=True) as progress:
            bar = progress.add_task("verifying", total=len(tasks))
            for t in tasks:
                try:
                    await idx.verify_task(t, None)
                except SecureCIError as exc:
                    failures += 1
                    sys.stderr.write(
                        f"task 0x{t.record.request.task_id.hex()} (edge 0x{t.edge.hex()} seq "
                        f"{t.record.result.edge_seq}): {exc}\n"
                    )
                progress.advance(bar)
    return failures, len(tasks)


@app.command()
def export(
    deployment: Deployment = None,
    rpc: Rpc = None,
    contract: Contract = None,
    index: Index = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    limit: Annotated[int, typer.Option(help="At most this many tasks.")] = 10_000_000,
) -> None:
    """Write every indexed task to stdout as JSON lines or CSV."""
    if fmt not in ("jsonl", "csv"):
        raise ConfigError("--format must be jsonl or csv")

    async def go() -> list[dict[str, Any]]:
        async with _opened(deployment, rpc, contract, index) as (idx, _):
            return [t.as_json() for t in idx.tasks(limit=limit)]

    rows = _run(go())
    if fmt == "jsonl":
        for row in rows:
            sys.stdout.write(json.dumps(row, sort_keys=True) + "\n")
        return
    if rows:
        writer = csv.DictWriter(sys.stdout, fieldnames=sorted(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
