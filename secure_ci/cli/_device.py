"""`secure-ci device ...`: a device's identity, inference through an attested edge, receipts."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from secure_ci.cli._common import DeploymentOption, read_file
from secure_ci.cli._keys import Passphrase, PassphraseEnv, PassphraseFile
from secure_ci.exceptions import AuthorizationError, ConfigError

if TYPE_CHECKING:
    import torch

    from secure_ci.attestation import Collateral, Policy
    from secure_ci.device import DeviceIdentity, Session
    from secure_ci.device._journal import DeviceJournal
    from secure_ci.ledger._deployment import Deployment
    from secure_ci.ledger._registry import RegisteredEdge
    from secure_ci.package import ModelPackage
    from secure_ci.partition import PartitionPlan

app = typer.Typer(help="Device-side client commands.", no_args_is_help=True)

MAX_INPUT_BYTES = 64 << 20
DEFAULT_JOURNAL = Path(".secure-ci/device-journal.sqlite")
Identity = Annotated[
    Path, typer.Option("--identity", help="The device's keystore (`secure-ci device keygen`).")
]
Journal = Annotated[
    Path, typer.Option("--journal", help="The device journal (SQLite) of tasks and receipts.")
]


def load_input(path: Path) -> torch.Tensor:
    """One input tensor from a ``.npy`` (no pickles) or ``.pt`` (``weights_only``) file."""
    import io
    import pickle

    import numpy as np
    import torch

    data = read_file(path, "input", MAX_INPUT_BYTES)
    try:
        if path.suffix == ".npy":
            value: Any = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
        elif path.suffix == ".pt":
            value = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        else:
            raise ConfigError(f"input {path} must be a .npy or .pt file")
    except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"cannot load input {path}: {exc}") from exc
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"input {path} does not hold a single tensor")
    return value.float()


def _samples(path: Path, shape: tuple[int, ...]) -> list[tuple[str, torch.Tensor]]:
    """The samples of one input file: one input, or a stack of them along dimension 0."""
    tensor = load_input(path)
    size = math.prod(shape)
    if tensor.numel() == size:
        return [(str(path), tensor.reshape(shape))]
    if tensor.dim() >= 1 and tensor.numel() == tensor.shape[0] * size:
        return [(f"{path}[{i}]", t.reshape(shape)) for i, t in enumerate(tensor)]
    raise ConfigError(f"input {path} has shape {tuple(tensor.shape)}; the model takes {shape}")


def _identity(path: Path, passphrase: Passphrase) -> DeviceIdentity:
    from secure_ci.cli._keys import load_private_key
    from secure_ci.device import DeviceIdentity

    return DeviceIdentity(load_private_key(path, "device identity", passphrase))


@app.command()
def keygen(
    out: Annotated[Path, typer.Option("--out", help="Keystore file to write (never overwritten).")],
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
    scrypt_n: Annotated[
        int, typer.Option(help="scrypt cost (a power of two; lower only for tests).")
    ] = 1 << 18,
) -> None:
    """Create a device identity: a new key in an encrypted keystore (Ethereum v3 JSON)."""
    from secure_ci.cli._keys import new_passphrase, write_keystore
    from secure_ci.device import DeviceIdentity

    if scrypt_n < 2 or scrypt_n & (scrypt_n - 1) or scrypt_n > 1 << 20:
        raise ConfigError("--scrypt-n must be a power of two up to 2**20")
    secret = new_passphrase(Passphrase(passphrase_file, passphrase_env), str(out))
    identity = DeviceIdentity.generate()
    write_keystore(out, identity.key, secret, scrypt_n=scrypt_n)
    typer.echo(f"device {identity.address_text}")
    typer.echo(f"wrote {out}")


@dataclass(frozen=True)
class _Model:
    head_source: Any  # the full model
    example: torch.Tensor
    plan: PartitionPlan
    shape: tuple[int, ...]
    package: ModelPackage | None = None


def _model(package: Path | None, zoo: str, seed: int, cut: int, codec: str) -> _Model:
    import torch

    from secure_ci.partition import PartitionPlan

    if package is not None:
        from secure_ci.package import load_package

        pkg = load_package(package)
        model, shape = pkg.build(), tuple(pkg.input_shape)
        plan = PartitionPlan(pkg.model_id.hex(), cut, codec)
        return _Model(model, torch.zeros(shape), plan, shape, pkg)
    from secure_ci.partition import Partitioner
    from secure_ci.zoo import get

    entry = get(zoo)
    torch.manual_seed(seed)
    model, shape = entry.build(), tuple(entry.input_shape)
    model_id = Partitioner(model, (torch.zeros(shape),)).model_id
    return _Model(model, torch.zeros(shape), PartitionPlan(model_id, cut, codec), shape)


async def _candidates(deployment: Deployment, edge: str | None) -> list[RegisteredEdge]:
    """The registered edges to try, best first (only usable ones)."""
    from secure_ci.ledger import open_ledger

    async with open_ledger(deployment.rpc, contract_address=deployment.contract_text) as ledger:
        if ledger.chain_id != deployment.chain_id:
            raise ConfigError(f"the node runs chain {ledger.chain_id}, not the deployment's")
        registry = await ledger.registered_edges()
    if edge is not None:
        named = [e for e in registry if e.endpoint == edge]
        if not named:
            raise AuthorizationError(f"edge {edge} is not registered on the ledger")
        return named  # open_session refuses it when it is revoked or not allowed
    usable = [e for e in registry if e.usable]
    if not usable:
        raise AuthorizationError("no edge on the ledger is active with an allowed measurement")
    return usable[::-1]  # the most recently registered first


async def _one(
    session: Session,
    journal: DeviceJournal,
    window: asyncio.Semaphore,
    address: str,
    name: str,
    x: torch.Tensor,
) -> dict[str, Any]:
    """One input through the session; its result is journalled before it is returned."""
    async with window:
        payload = await asyncio.to_thread(session.encode_input, x)
        output, receipt = await session.infer_encoded(payload)
    journal.record(receipt)
    flat = output if not isinstance(output, tuple) else output[0]
    return {
        "input": name,
        "edge": address,
        "task_id": "0x" + receipt.request.task_id.hex(),
        "argmax": int(flat.argmax()),
        "output": [round(float(v), 6) for v in flat.flatten()],
    }


async def _infer(
    targets: list[tuple[str, RegisteredEdge | None]],
    policy: Policy,
    collateral: Collateral,
    identity: DeviceIdentity,
    model: _Model,
    samples: list[tuple[str, torch.Tensor]],
    deployment: Deployment | None,
    journal: DeviceJournal,
    request_timeout: float,
    clock: Callable[[], float],
) -> int:
    from secure_ci.device import DEFAULT_DOMAIN, open_session
    from secure_ci.partition import DEFAULT_CANONICAL

    domain = deployment.domain if deployment is not None else DEFAULT_DOMAIN
    failures = []
    for address, registration in targets:
        try:
            async with open_session(
                address, policy=policy, collateral=collateral, identity=identity,
                model=model.head_source, plan=model.plan, example_input=model.example,
                ledger_domain=domain, timeout=request_timeout, clock=clock,
                registration=registration,
                canonical=DEFAULT_CANONICAL if model.package is None else model.package.canonical,
            ) as session:  # fmt: skip
                window = asyncio.Semaphore(session.max_in_flight)
                jobs = [
                    asyncio.create_task(_one(session, journal, window, address, n, x))
                    for n, x in samples
                ]
                try:
                    for job in jobs:  # in input order, each once it is journalled
                        typer.echo(json.dumps(await job))
                finally:
                    for job in jobs:
                        job.cancel()
                    await asyncio.gather(*jobs, return_exceptions=True)
                    for request, signature in session.unanswered:  # challengeable later
                        journal.record_unanswered(request, signature, domain)
                return len(jobs)
        except AuthorizationError as exc:
            failures.append(str(exc))
            if len(targets) == 1:
                raise
    raise AuthorizationError("no edge could be used: " + "; ".join(failures))


@app.command()
def infer(
    inputs: Annotated[list[Path], typer.Argument(help="Inputs (.npy or .pt): one, or a stack.")],
    identity: Identity,
    policy: Annotated[Path, typer.Option("--policy", help="Attestation policy (TOML).")],
    deployment: DeploymentOption = None,
    edge: Annotated[
        str | None,
        typer.Option(help="Edge HOST:PORT (with --deployment: one of the registered edges)."),
    ] = None,
    package: Annotated[
        Path | None, typer.Option(help="Model package (`secure-ci model pack`).")
    ] = None,
    collateral: Annotated[
        Path | None,
        typer.Option(help="Collateral bundle (JSON); default: collateral.json by the policy."),
    ] = None,
    journal: Journal = DEFAULT_JOURNAL,
    model: Annotated[str, typer.Option(help="Zoo model, untrained (without --package).")] = (
        "digits_cnn"
    ),
    seed: Annotated[int, typer.Option(help="Zoo weights seed (without --package).")] = 0,
    cut: Annotated[int, typer.Option(help="Cut index.")] = 2,
    codec: Annotated[str, typer.Option(help="Boundary feature codec.")] = "int8",
    timeout: Annotated[float, typer.Option(help="Seconds per request and handshake.")] = 30.0,
    at: Annotated[int | None, typer.Option(help="Pin the clock (Unix seconds).")] = None,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="Plan each input over every registered edge (cut, codec, edge-only or"
            " device-only) and fail over when an edge dies (needs --package).",
        ),
    ] = False,
    deadline_ms: Annotated[
        float, typer.Option(help="With --plan: each input's deadline (ms).")
    ] = math.inf,
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
) -> None:
    """Run INPUTs through the model split between this device and an attested edge.

    With --deployment the edge comes from the ledger's registry and is refused, before a
    feature byte is sent, unless it is active, its measurement allowed, and its attested
    enclave key, measurement and quote id are the registered ones. Prints one JSON line per
    input; every verified result is kept in the device journal first. With --plan, the
    device chooses per input where it runs (by the package's profile and what it measures
    of each edge), moves a task whose edge dies to the next one or finishes it here, and
    first completes any task a previous run left unfinished (the journal writes ahead).
    """
    from secure_ci.attestation import Collateral, Policy
    from secure_ci.cli._common import load_deployment
    from secure_ci.device._journal import DeviceJournal
    from secure_ci.device._session import parse_edge_address
    from secure_ci.ledger._deployment import Deployment

    if deployment is None and edge is None:
        raise ConfigError("give --deployment FILE (edges from the ledger) or --edge HOST:PORT")
    if plan and package is None:
        raise ConfigError("--plan needs --package (the planner uses the package's profile)")
    if not deadline_ms > 0:
        raise ConfigError("--deadline-ms must be > 0")
    if edge is not None:
        parse_edge_address(edge)
    found = load_deployment(deployment) if deployment is not None else None
    the_deployment = found if isinstance(found, Deployment) else None
    the_policy = Policy.from_toml(
        read_file(policy, "policy", 1 << 20).decode("utf-8", "replace"), base_dir=policy.parent
    )
    bundle = read_file(collateral or policy.parent / "collateral.json", "collateral", 1 << 22)
    the_collateral = Collateral.from_json(bundle)
    device = _identity(identity, Passphrase(passphrase_file, passphrase_env))
    the_model = _model(package, model, seed, cut, codec)
    samples = [s for path in inputs for s in _samples(path, the_model.shape)]
    clock = time.time if at is None else (lambda: float(at))
    journal.parent.mkdir(parents=True, exist_ok=True)

    async def go() -> int:
        if the_deployment is None:
            targets: list[tuple[str, RegisteredEdge | None]] = [(str(edge), None)]
        else:
            targets = [(e.endpoint, e) for e in await _candidates(the_deployment, edge)]
        with DeviceJournal.open(journal) as book:
            if plan and the_model.package is not None:
                from secure_ci.cli._fleet import infer_planned
                from secure_ci.device import DEFAULT_DOMAIN

                return await infer_planned(
                    [r if r is not None else name for name, r in targets],
                    package=the_model.package, policy=the_policy,
                    collateral=the_collateral, identity=device, samples=samples,
                    domain=the_deployment.domain if the_deployment else DEFAULT_DOMAIN,
                    journal=book, deadline_ms=deadline_ms, connect_timeout=timeout,
                    clock=clock,
                )  # fmt: skip
            return await _infer(
                targets, the_policy, the_collateral, device, the_model, samples,
                the_deployment, book, timeout, clock,
            )  # fmt: skip

    asyncio.run(go())


def _export_receipts(book: Any, path: Path) -> None:
    """Write the journal's signed receipts (requests and results with both signatures, never
    the salts) as a receipts file (docs/ledger-format.md 6.4); one chain per file."""
    from secure_ci.ledger._audit_receipts import DeviceReceipt, encode_receipts

    tasks = [t.receipt for t in book.tasks()]
    domains = {r.domain for r in tasks}
    if len(domains) > 1:
        raise ConfigError("the journal holds receipts of several chains: one file per chain")
    if not domains:
        raise ConfigError("the journal holds no receipts to export")
    receipts = [DeviceReceipt(r.request, r.result, r.device_sig, r.edge_sig) for r in tasks]
    try:
        path.write_bytes(encode_receipts(domains.pop(), receipts))
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from exc


@app.command()
def receipts(
    journal: Journal = DEFAULT_JOURNAL,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Look each task up on the ledger; challenge overdue ones, and the edge of"
            " each overdue request that got no result (with the signed request alone).",
        ),
    ] = False,
    deployment: DeploymentOption = None,
    identity: Annotated[
        Path | None, typer.Option("--identity", help="Device keystore (challenges sign).")
    ] = None,
    grace: Annotated[int, typer.Option(help="Seconds after a deadline before a challenge.")] = 60,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per task.")] = False,
    passphrase_file: PassphraseFile = None,
    passphrase_env: PassphraseEnv = None,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            help="Write the signed receipts (no salts) for `audit verify --receipts` here.",
        ),
    ] = None,
) -> None:
    """The device journal's tasks and their state: answered, anchored or challenged; and
    the requests that got no result: unanswered, or request-challenged."""
    from secure_ci.device._journal import DeviceJournal

    if not journal.exists():
        raise ConfigError(f"no device journal at {journal} (`device infer` writes it)")
    with DeviceJournal.open(journal) as book:
        if export is not None:
            _export_receipts(book, export)
        if check:
            if deployment is None or identity is None:
                raise ConfigError("--check needs --deployment FILE and --identity FILE")
            device = _identity(identity, Passphrase(passphrase_file, passphrase_env))
            asyncio.run(_check(book, deployment, device, grace))
        rows = [
            {
                "task_id": "0x" + t.task_id.hex(),
                "edge": "0x" + t.receipt.request.edge.hex(),
                "edge_seq": t.receipt.result.edge_seq,
                "state": t.state,
                "challenge_id": t.challenge_id,
            }
            for t in book.tasks()
        ]
        rows += [
            {
                "task_id": "0x" + u.request.task_id.hex(),
                "edge": "0x" + u.request.edge.hex(),
                "edge_seq": None,
                "state": "unanswered" if u.challenge_id is None else "request-challenged",
                "challenge_id": u.challenge_id,
            }
            for u in book.unanswered()
        ]
    for row in rows:
        if as_json:
            typer.echo(json.dumps(row))
        else:
            extra = f" challenge {row['challenge_id']}" if row["challenge_id"] is not None else ""
            seq = f" seq {row['edge_seq']}" if row["edge_seq"] is not None else ""
            typer.echo(f"{row['task_id']}  edge {row['edge']}{seq}  {row['state']}{extra}")
    tasks = [r for r in rows if r["edge_seq"] is not None]
    counts = {
        s: sum(r["state"] == s for r in tasks) for s in ("answered", "anchored", "challenged")
    }
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    if len(rows) > len(tasks):
        pending = sum(r["state"] == "unanswered" for r in rows)
        summary += (
            f"; {len(rows) - len(tasks)} request(s) without a result: {pending} unanswered,"
            f" {len(rows) - len(tasks) - pending} request-challenged"
        )
    typer.echo(f"{len(tasks)} task(s): {summary}", err=as_json)


async def _check(
    book: DeviceJournal, deployment_file: Path, device: DeviceIdentity, grace: int
) -> None:
    from secure_ci.cli._common import load_deployment
    from secure_ci.device._reconcile import reconcile
    from secure_ci.ledger import open_ledger
    from secure_ci.ledger._deployment import Deployment

    found = load_deployment(deployment_file)
    if not isinstance(found, Deployment):
        raise ConfigError("--check needs a deployment file")
    async with open_ledger(found.rpc, contract_address=found.contract_text) as ledger:
        done = await reconcile(book, ledger, device, domain=found.domain, grace=grace)
    typer.echo(f"checked against the ledger: {done}", err=True)
