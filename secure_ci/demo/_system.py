"""The whole system on one machine: ledger, attested edge, devices, anchoring, receipts, audit.

One asyncio loop owns everything, so the embedded in-process chain can be shared: a fresh
development PKI stands in for Intel's (the simulated enclave provider quotes under it), the
SecureCILedger contract is deployed on the chain, a party registers the edge (enclave key,
measurement, quote id) and two fleets register their devices. The edge serves the trained
digits CNN's tail over attested TLS 1.3, journals every signed result, and its anchorer puts
the batches on chain; each device checks that its tasks are anchored (its receipts), and an
auditor indexes the chain's calldata and verifies every task.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from eth_account import Account
from torch import nn

from secure_ci.attestation import DevPKI, Policy, SimulatedProvider
from secure_ci.device import DeviceIdentity, Session, open_session
from secure_ci.edge import (
    EdgeConfig,
    ModelRegistry,
    TailEntry,
    create_identity,
    open_edge,
    tails_from_partitioner,
)
from secure_ci.exceptions import ConfigError, SecureCIError
from secure_ci.ledger import Anchorer, AuditIndex, Journal, ReceiptBook, open_ledger
from secure_ci.partition import PartitionPlan
from secure_ci.partition._guard import running
from secure_ci.plan import EDGE_ONLY_CUT

if TYPE_CHECKING:
    from secure_ci.zoo._train import TrainedDigits

__all__ = ["EDGE_ONLY_CUT", "SystemDemoConfig", "run_system_demo"]

DEMO_MRENCLAVE = hashlib.sha256(b"secure-ci demo edge enclave").digest()
DEMO_MRSIGNER = hashlib.sha256(b"secure-ci demo signer").digest()
ETHER = 10**18

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SystemDemoConfig:
    """What the demo runs: devices, tasks per mode, the collaborative split and the chain."""

    workdir: Path
    devices: int = 4
    tasks: int = 200
    cut: str = "pool1"
    codec: str = "int8"
    rpc: str | None = None
    batch_records: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 64:
            raise ConfigError("--devices must be between 1 and 64")
        if not self.devices <= self.tasks <= 100_000:
            raise ConfigError("--tasks must be at least --devices and at most 100000")


class _InputHead(nn.Module):
    """The empty head of edge-only inference: the input itself is the boundary."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x,)


@dataclass
class _ModeStats:
    mode: str
    latencies: list[float]
    correct: int = 0
    failed: int = 0
    bytes_sent: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        done = len(self.latencies)
        return {
            "mode": self.mode,
            "tasks": done,
            "failed": self.failed,
            "latency_ms_p50": round(statistics.median(self.latencies), 3) if done else None,
            "bytes_per_task": round(self.bytes_sent / done, 1) if done else 0.0,
            "accuracy": round(self.correct / done, 4) if done else 0.0,
            "errors": self.errors[:5],
        }


def _device_only(trained: TrainedDigits, samples: Sequence[int]) -> _ModeStats:
    x, y = trained.data.test_x, trained.data.test_y
    stats = _ModeStats("device-only", [])
    with running(), torch.inference_mode():
        trained.model(x[:1])  # warm-up
        for i in samples:
            start = time.perf_counter()
            logits = trained.model(x[i : i + 1])
            stats.latencies.append(1000 * (time.perf_counter() - start))
            stats.correct += int(int(logits.argmax(dim=1)[0]) == int(y[i]))
    return stats


def _shares(total: int, parts: int) -> list[list[int]]:
    return [list(range(k, total, parts)) for k in range(parts)]


async def _device_run(
    session: Session, trained: TrainedDigits, samples: Sequence[int], stats: _ModeStats
) -> None:
    """One request at a time (the latency a camera sees); devices run concurrently."""
    x, y = trained.data.test_x, trained.data.test_y
    before, done = session.bytes_sent, 0
    try:
        for i in samples:
            start = time.perf_counter()
            out = await session.infer(x[i : i + 1])
            stats.latencies.append(1000 * (time.perf_counter() - start))
            logits = out if isinstance(out, torch.Tensor) else out[0]
            stats.correct += int(int(logits.argmax(dim=1)[0]) == int(y[i]))
            done += 1
    except SecureCIError as exc:  # the device reports and stops; the others go on
        stats.failed += len(samples) - done
        stats.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        stats.bytes_sent += session.bytes_sent - before


async def run_system_demo(
    trained: TrainedDigits, config: SystemDemoConfig, *, progress: Progress | None = None
) -> dict[str, Any]:
    """Run device-only, edge-only and collaborative inference through the whole system."""
    report = progress or (lambda _what, _done, _total: None)
    cuts = {c.name: c for c in trained.partitioner.cuts}
    if config.cut not in cuts:
        raise ConfigError(f"unknown cut {config.cut!r}; cuts: {', '.join(cuts)}")
    cut = cuts[config.cut]
    now = int(time.time())
    report("attestation: dev PKI and enclave identity", 0, 1)
    pki = DevPKI.generate(now)
    provider = SimulatedProvider(pki, mrenclave=DEMO_MRENCLAVE, mrsigner=DEMO_MRSIGNER)
    policy = Policy(roots=(pki.root_der,), mrenclave=frozenset({DEMO_MRENCLAVE}))
    identity = await asyncio.to_thread(create_identity, provider, now=now)
    edge_account = Account.from_key(identity.signing_key)
    devices = [DeviceIdentity.generate() for _ in range(config.devices)]

    backend = config.rpc or "inprocess"
    report(f"ledger: deploying on {backend}", 0, 1)
    async with open_ledger(backend) as ledger:
        operator, fleets = Account.create(), [Account.create(), Account.create()]
        for account in (operator, *fleets, edge_account):
            await ledger.fund(account.address, ETHER)
        edge_party = await ledger.register_party(operator.address)
        fleet_parties = [await ledger.register_party(f.address) for f in fleets]
        await ledger.allow_measurement(identity.measurement)
        await ledger.register_edge(
            operator, edge_party, edge_account, identity.measurement,
            identity.quote_id, "127.0.0.1",
        )  # fmt: skip
        await ledger.register_model(
            fleets[0], fleet_parties[0], bytes.fromhex(trained.partitioner.model_id)
        )
        for k, device in enumerate(devices):
            await ledger.register_device(fleets[k % 2], fleet_parties[k % 2], device)
        # The edge admits exactly the devices the chain's registry holds.
        allowed = frozenset(
            [d.address for d in devices if await ledger.is_registered_device(d.address_text)]
        )
        models = _models(trained, cut.index, config.codec)
        edge_config = EdgeConfig(
            host="127.0.0.1", provider="simulated", chain_id=ledger.chain_id,
            contract=bytes.fromhex(ledger.address[2:]),
        )  # fmt: skip
        samples = [i % len(trained.data.test_x) for i in range(config.tasks)]
        modes = [_device_only(trained, samples)]
        journal = Journal.open(config.workdir / "edge-journal.sqlite", edge=identity.address)
        anchorer = Anchorer(journal, ledger, edge_account, max_records=config.batch_records)
        books = [ReceiptBook(ledger, ledger.domain, Account.from_key(d.key)) for d in devices]
        try:
            stop = asyncio.Event()
            async with open_edge(
                edge_config, provider=provider, models=models, allowed_devices=allowed,
                journal=journal, identity=identity,
            ) as edge, asyncio.TaskGroup() as background:  # fmt: skip
                background.create_task(anchorer.run(stop=stop))
                address = f"127.0.0.1:{edge.port}"
                for mode, plan, model, example in (
                    ("edge-only", _plan(trained, EDGE_ONLY_CUT, "float32"), _InputHead(), None),
                    (
                        "collaborative",
                        _plan(trained, cut.index, config.codec),
                        trained.model,
                        trained.data.test_x[:1],
                    ),
                ):
                    report(f"{mode}: {config.devices} devices", 0, config.tasks)
                    stats = _ModeStats(mode, [])
                    await _run_mode(
                        address, config, policy, pki, devices, books, model, plan, example,
                        trained, samples, stats,
                    )  # fmt: skip
                    modes.append(stats)
                stop.set()
            report("ledger: anchoring the last batch", 0, 1)
            await anchorer.flush()
            receipts = 0
            for book in books:
                await book.check(int(time.time()))
                receipts += len(book.receipts)
            ledger_summary = await _audit(config.workdir, ledger, identity.address, receipts)
        finally:
            journal.close()
    completed = sum(len(m.latencies) for m in modes)
    return {
        "tasks_completed": completed,
        "tasks_failed": sum(m.failed for m in modes),
        "devices": config.devices,
        "model": "digits_cnn",
        "model_test_accuracy": round(trained.accuracy, 4),
        "cut": cut.name,
        "codec": config.codec,
        "modes": [m.summary() for m in modes],
        "enclave": {
            "mrenclave": DEMO_MRENCLAVE.hex(),
            "quote_id": identity.quote_id.hex(),
            "address": identity.address_text,
        },
        "ledger": ledger_summary,
    }


def _plan(trained: TrainedDigits, cut: int, codec: str) -> PartitionPlan:
    return PartitionPlan(model_id=trained.partitioner.model_id, cut=cut, codec=codec)


def _models(trained: TrainedDigits, cut: int, codec: str) -> ModelRegistry:
    from secure_ci.partition import TensorSpec

    models = ModelRegistry()
    for entry in tails_from_partitioner(trained.partitioner, [cut], [codec]):
        models.add(entry)
    inputs = tuple(TensorSpec((1, *s.shape[1:]), s.dtype) for s in trained.partitioner.input_specs)
    model_id = bytes.fromhex(trained.partitioner.model_id)
    models.add(TailEntry(model_id, EDGE_ONLY_CUT, trained.model, inputs, frozenset({"float32"})))
    return models


async def _run_mode(
    address: str,
    config: SystemDemoConfig,
    policy: Policy,
    pki: DevPKI,
    devices: Sequence[DeviceIdentity],
    books: Sequence[ReceiptBook],
    model: nn.Module,
    plan: PartitionPlan,
    example: torch.Tensor | None,
    trained: TrainedDigits,
    samples: Sequence[int],
    stats: _ModeStats,
) -> None:
    """Every device opens its own attested session and runs its share of the samples."""

    async def one(k: int, share: list[int]) -> None:
        async with open_session(
            address, policy=policy, collateral=pki.collateral, identity=devices[k],
            model=model, plan=plan, example_input=example, ledger_domain=books[k].domain,
        ) as session:  # fmt: skip
            try:
                await _device_run(session, trained, share, stats)
            finally:
                for r in session.receipts:
                    books[k].track(r.request, r.result, r.device_sig, r.edge_sig)

    async with asyncio.TaskGroup() as group:
        for k, share in enumerate(_shares(len(samples), config.devices)):
            group.create_task(one(k, [samples[i] for i in share]))


async def _audit(workdir: Path, ledger: Any, edge: bytes, receipts: int) -> dict[str, Any]:
    """Index every anchored task from the chain's calldata and verify each one."""
    with AuditIndex(workdir / "audit-index.sqlite", ledger.domain) as index:
        await index.sync(ledger, ["0x" + edge.hex()])
        tasks = index.tasks(limit=1_000_000)
        verified = 0
        for task in tasks:
            await index.verify_task(task, ledger)
            verified += 1
        state = await ledger.edge_state("0x" + edge.hex())
    return {
        "tasks_recorded": int(state.next_seq),
        "tasks_anchored": len(tasks),
        "tasks_verified": verified,
        "receipts": receipts,
        "batches": int(state.next_batch_id),
        "contract": ledger.address,
        "chain_id": ledger.chain_id,
    }
