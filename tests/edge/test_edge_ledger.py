"""The edge on the shared ledger: the ``[ledger]`` config, the registry cache, and on anvil
the whole flow (registration, registered devices only, every completed task anchored), both
in-process through ``open_edge_ledger`` and as ``secure-ci edge serve`` in a subprocess."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from edge_helpers import CUT, build_partitioner, registry
from eth_account import Account
from eth_account.signers.local import LocalAccount

from secure_ci.attestation import Collateral, Policy
from secure_ci.cli._edge import _operator_key
from secure_ci.device import DeviceIdentity, open_session
from secure_ci.edge import (
    EdgeConfig,
    EdgeLimits,
    LedgerSettings,
    RegisteredDevices,
    _ledger,
    create_identity,
    load_edge_config,
    open_edge,
    open_edge_ledger,
)
from secure_ci.edge._ledger import LOG_CHUNK_BLOCKS, EdgeLedger
from secure_ci.edge._state import DevSealedStore
from secure_ci.exceptions import (
    ChainError,
    ConfigError,
    RemoteProtocolError,
)
from secure_ci.ledger import (
    AnchoredHead,
    AnvilNode,
    AuditIndex,
    EpochState,
    Journal,
    LedgerClient,
    ReceiptBook,
    SealedEpochStore,
    find_anvil,
    open_ledger,
    run_anvil,
)
from secure_ci.partition import PartitionPlan
from secure_ci.protocol import ErrorCode
from secure_ci.testing import DEV_MRENCLAVE, DEV_NOW, dev_enclave

CONTRACT = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
LEDGER_TABLE = f"""
[ledger]
rpc = "http://127.0.0.1:8545"
contract = "{CONTRACT}"
operator_key_file = "operator.key"
party_id = 1
"""
BASE = """
journal_dir = "journal"
[listen]
port = 7443
[[models]]
zoo = "digits_cnn"
cuts = [2]
"""

# ------------------------------------------------------------------ configuration


def test_ledger_table_parses_with_defaults(tmp_path: Path) -> None:
    config = load_edge_config(BASE + LEDGER_TABLE, tmp_path)
    assert config.ledger == LedgerSettings(
        rpc="http://127.0.0.1:8545",
        contract=bytes.fromhex(CONTRACT[2:]),
        party_id=1,
        operator_key_file=(tmp_path / "operator.key").resolve(),
    )
    assert (config.ledger.batch_records, config.ledger.batch_seconds) == (256, 2.0)
    assert load_edge_config(BASE, tmp_path).ledger is None  # absent: the old behaviour
    full = LEDGER_TABLE + 'endpoint = "edge:1"\nbatch_records = 3\nbatch_seconds = 0.5\n'
    full += "refresh_seconds = 0.25\nfund_wei = 5\n"
    settings = load_edge_config(BASE + full, tmp_path).ledger
    assert settings is not None
    assert (settings.endpoint, settings.batch_records, settings.batch_seconds) == ("edge:1", 3, 0.5)
    assert (settings.refresh_seconds, settings.fund_wei) == (0.25, 5)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("http://127.0.0.1:8545", "ftp://x"), "http"),
        (lambda t: t.replace("http://127.0.0.1:8545", "inprocess"), "http"),
        (lambda t: t.replace(CONTRACT, "0x" + "00" * 20), "zero address"),
        (lambda t: t.replace(CONTRACT, CONTRACT.lower()[:-1]), "not an address"),
        (lambda t: t.replace("party_id = 1", "party_id = 0"), "party_id"),
        (lambda t: t.replace("party_id = 1", 'party_id = "1"'), "party_id"),
        (lambda t: t.replace("party_id = 1", "party_id = 1.5"), "integers"),
        (lambda t: t.replace("party_id = 1\n", ""), "needs party_id"),
        (lambda t: t + "batch_records = 0\n", "batch_records"),
        (lambda t: t + "batch_seconds = -1.0\n", "batch_seconds"),
        (lambda t: t + "refresh_seconds = true\n", "refresh_seconds"),
        (lambda t: t + "fund_wei = -1\n", "fund_wei"),
        (lambda t: t + 'endpoint = ""\n', "endpoint"),
        (lambda t: t + "surprise = 1\n", "unknown ledger keys"),
        (lambda t: 'allowed_devices = ["' + CONTRACT + '"]\n' + t, "allow-list"),
        (lambda t: "chain_id = 1\n" + t, "come from the chain"),
        (lambda t: t.replace('journal_dir = "journal"', ""), "journal_dir"),
        (lambda t: t.replace("port = 7443", "port = 0"), "endpoint"),
        (lambda t: "ledger = 1\n" + t[: t.index("[ledger]")], "must be a table"),
    ],
)
def test_bad_ledger_tables_are_config_errors(tmp_path: Path, edit: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_edge_config(edit(BASE + LEDGER_TABLE), tmp_path)


def test_operator_key_file(tmp_path: Path) -> None:
    path = tmp_path / "operator.key"
    key = bytes(range(1, 33))
    path.write_text("0x" + key.hex() + "\n")
    assert _operator_key(path) == key
    for bad in ("", "zz" * 32, "ab" * 31):
        path.write_text(bad)
        with pytest.raises(ConfigError, match="32-byte"):
            _operator_key(path)
    with pytest.raises(ConfigError, match="cannot read"):
        _operator_key(tmp_path / "missing.key")


async def test_open_edge_ledger_needs_a_ledger_table_and_a_key(tmp_path: Path) -> None:
    enclave = dev_enclave(DEV_NOW)
    identity = create_identity(enclave.provider, now=DEV_NOW)
    with Journal.open(tmp_path / "j.sqlite", edge=identity.address) as journal:
        with pytest.raises(ConfigError, match=r"no \[ledger\]"):
            async with open_edge_ledger(EdgeConfig(), identity, bytes(32), journal=journal):
                pass
        settings = LedgerSettings("http://127.0.0.1:1", bytes.fromhex(CONTRACT[2:]), 1, None, "e")
        config = EdgeConfig(journal_dir=tmp_path, ledger=settings)
        with pytest.raises(ConfigError, match="operator key"):
            async with open_edge_ledger(config, identity, bytes(32), journal=journal):
                pass


# ------------------------------------------------------------------ registry cache


class FakeDeviceLog:
    """Registry events at given blocks; records the block ranges it was asked for."""

    def __init__(self) -> None:
        self.latest = 0
        self.events: list[tuple[int, bytes, bool]] = []
        self.queries: list[tuple[int, int]] = []

    async def block_number(self) -> int:
        return self.latest

    async def device_events(self, first: int, last: int) -> list[tuple[bytes, bool]]:
        self.queries.append((first, last))
        return [(d, on) for block, d, on in self.events if first <= block <= last]


async def test_registered_devices_follow_the_events_in_order() -> None:
    source = FakeDeviceLog()
    devices = RegisteredDevices(source)
    a, b = b"\xaa" * 20, b"\xbb" * 20
    assert a not in devices
    assert len(devices) == 0
    source.events += [(1, a, True), (1, b, True), (2, b, False)]
    source.latest = 2
    assert await devices.refresh() == 3
    assert a in devices
    assert b not in devices
    assert "not bytes" not in devices
    source.events += [(3, b, True), (3, a, False), (3, a, True)]  # revoked, then re-registered
    source.latest = 3
    source.queries.clear()
    assert await devices.refresh() == 3  # only the new blocks are read
    assert source.queries == [(3, 3)]
    assert a in devices
    assert b in devices
    assert len(devices) == 2
    source.latest = 3 + 2 * LOG_CHUNK_BLOCKS
    source.events.append((source.latest, a, False))
    source.queries.clear()
    assert await devices.refresh() == 1
    assert len(source.queries) == 2
    assert source.queries[-1][1] == source.latest
    assert a not in devices
    assert await devices.refresh() == 0


class FlakyChain:
    """A ledger connection that fails ``failures`` times with a transport error, then ends."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.runs = 0

    async def __call__(self, stop: asyncio.Event) -> None:
        self.runs += 1
        if self.runs <= self.failures:
            raise ChainError("node unreachable")


def _supervised(flaky: FlakyChain, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> EdgeLedger:
    identity = create_identity(dev_enclave(DEV_NOW).provider, now=DEV_NOW)
    settings = LedgerSettings("http://127.0.0.1:1", b"\x01" * 20, 1, endpoint="e", chain_id=7)
    journal = Journal.open(tmp_path / f"j{flaky.failures}.sqlite", edge=identity.address)
    ledger = EdgeLedger(
        settings=settings, edge_config=EdgeConfig(ledger=settings, journal_dir=tmp_path),
        identity=identity, operator=Account.create(), journal=journal,
        devices=RegisteredDevices(), endpoint="e",
    )  # fmt: skip
    monkeypatch.setattr(ledger, "_connection", flaky)
    return ledger


async def test_the_ledger_supervisor_retries_and_gives_up_only_after_stop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(_ledger, "RETRY_SECONDS", (0.001, 0.004))
    flaky = FlakyChain(failures=5)
    await asyncio.wait_for(
        _supervised(flaky, monkeypatch, tmp_path)._supervise(asyncio.Event()), 10
    )
    assert flaky.runs == 6  # retried while serving, never raised
    stopped = asyncio.Event()
    stopped.set()
    broken = FlakyChain(failures=100)
    await asyncio.wait_for(_supervised(broken, monkeypatch, tmp_path)._supervise(stopped), 10)
    assert broken.runs == _ledger.SHUTDOWN_ATTEMPTS  # bounded once the edge stopped


async def test_a_configuration_error_ends_the_supervisor(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async def wrong_chain(stop: asyncio.Event) -> None:
        raise ConfigError("the node runs chain 1, the deployment is on chain 7")

    ledger = _supervised(FlakyChain(0), monkeypatch, tmp_path)
    monkeypatch.setattr(ledger, "_connection", wrong_chain)
    with pytest.raises(ConfigError, match="chain 7"):
        await asyncio.wait_for(ledger._supervise(asyncio.Event()), 10)


# ------------------------------------------------------------------ on anvil


@pytest.fixture(scope="module")
def anvil() -> Iterator[AnvilNode]:
    if find_anvil() is None:
        pytest.skip("anvil missing from ledger/node_modules (run `make node`)")
    with run_anvil() as node:
        yield node


@dataclass
class Chain:
    node: AnvilNode
    ledger: LedgerClient
    operator: LocalAccount
    party: int
    fleet: LocalAccount
    fleet_party: int


@pytest.fixture
async def chain(anvil: AnvilNode) -> AsyncIterator[Chain]:
    """A fresh contract; the operator (dev key 1) runs party 1's edges, dev key 2 a fleet."""
    owner, operator, fleet = (Account.from_key(k) for k in anvil.keys[:3])
    async with open_ledger(anvil.url, deployer=owner) as ledger:
        party = await ledger.register_party(operator.address)
        fleet_party = await ledger.register_party(fleet.address)
        yield Chain(anvil, ledger, operator, party, fleet, fleet_party)


def _plan() -> PartitionPlan:
    return PartitionPlan(build_partitioner().model_id, CUT, "float32")


@dataclass(frozen=True)
class Trust:
    """What a device trusts (a DevEnclave has the same two fields)."""

    policy: Policy
    collateral: Collateral


def _session(port: int, device: DeviceIdentity, trust: Any, chain: Chain, **options: Any) -> Any:
    partitioner = build_partitioner()
    options.setdefault("clock", lambda: float(DEV_NOW))
    return open_session(
        f"127.0.0.1:{port}", policy=trust.policy, collateral=trust.collateral,
        identity=device, model=partitioner.model, plan=_plan(),
        example_input=partitioner.example_inputs[0], ledger_domain=chain.ledger.domain,
        timeout=30.0, **options,
    )  # fmt: skip


async def _refused(port: int, device: DeviceIdentity, trust: Any, chain: Chain, **kw: Any) -> int:
    with pytest.raises(RemoteProtocolError) as refused:
        async with _session(port, device, trust, chain, **kw):
            pass
    return refused.value.code


async def _until(predicate: Any) -> None:
    """Wait (bounded) for the edge's background refresh to make ``predicate`` true."""
    for _ in range(1500):
        if predicate():
            return
        await asyncio.sleep(0.02)
    pytest.fail("the device registry was not refreshed within 30 s")


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Wait (bounded) until a log record contains ``text``."""
    for _ in range(1500):
        if any(text in r.getMessage() for r in caplog.records):
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"nothing logged {text!r} within 30 s")


@pytest.fixture
def fast_retry(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(_ledger, "RETRY_SECONDS", (0.05, 0.2))
    caplog.set_level("INFO", logger="secure_ci")


async def _audited(chain: Chain, edge: bytes, path: Path) -> int:
    """Index the edge's batches from the chain's calldata and verify every task."""
    with AuditIndex(path, chain.ledger.domain) as index:
        await index.sync(chain.ledger, ["0x" + edge.hex()])
        tasks = index.tasks(limit=10_000)
        for task in tasks:
            await index.verify_task(task, chain.ledger)
        return len(tasks)


@pytest.mark.anvil
@pytest.mark.slow
async def test_edge_registers_admits_registered_devices_and_anchors(
    chain: Chain, tmp_path: Path, caplog: pytest.LogCaptureFixture, fast_retry: None
) -> None:
    enclave = dev_enclave(DEV_NOW)
    identity = create_identity(enclave.provider, now=DEV_NOW)
    member, late, stranger = (DeviceIdentity.generate() for _ in range(3))
    await chain.ledger.register_device(chain.fleet, chain.fleet_party, member)
    # not yet allowed: the edge serves on, says why it is not on the ledger, and retries
    settings = LedgerSettings(
        chain.node.url, bytes.fromhex(chain.ledger.address[2:]), chain.party,
        endpoint="edge.test:7443", batch_records=4, batch_seconds=0.2, refresh_seconds=0.05,
    )  # fmt: skip
    config = EdgeConfig(limits=EdgeLimits(max_wait_ms=1.0), journal_dir=tmp_path, ledger=settings)
    operator_key = bytes(chain.operator.key)
    book = ReceiptBook(chain.ledger, chain.ledger.domain, Account.from_key(member.key))
    with Journal.open(tmp_path / "edge.sqlite", edge=identity.address) as journal:
        async with open_edge_ledger(config, identity, operator_key, journal=journal) as waiting:
            await _logged(caplog, "is not a valid release on the ledger")
            assert not waiting.connected.is_set()
        async with open_edge_ledger(
            config, identity, bytes(chain.fleet.key), journal=journal
        ) as wrong:  # the fleet's admin is not party 1's admin
            await chain.ledger.allow_measurement(identity.measurement)
            await _logged(caplog, "NotPartyAdmin")
            assert not wrong.connected.is_set()
        xs = [torch.randn(1, 1, 32, 32) for _ in range(6)]
        sealed = DevSealedStore(tmp_path / "sealed", identity.measurement)
        async with (
            open_edge_ledger(
                config, identity, operator_key, journal=journal, sealed=sealed
            ) as on_chain,
            open_edge(
                on_chain.edge_config, provider=enclave.provider, models=registry(),
                allowed_devices=on_chain.devices, journal=journal, identity=identity,
                clock=lambda: float(DEV_NOW),
            ) as edge,
        ):  # fmt: skip
            await asyncio.wait_for(on_chain.wait_connected(), 60)
            assert on_chain.registrations == 1
            assert on_chain.edge_config.chain_id == chain.node.chain_id
            assert on_chain.funded_wei == settings.fund_wei  # a fresh enclave key had nothing
            assert member.address in on_chain.devices
            assert len(on_chain.devices) == 1
            async with _session(edge.port, member, enclave, chain) as session:
                assert len(await session.infer_many(xs)) == len(xs)
                for r in session.receipts:
                    book.track(r.request, r.result, r.device_sig, r.edge_sig)
            # the device forces a record onto the chain at once: the edge answers the
            # challenge with the inclusion proof as soon as the record's batch is anchored
            forced = session.receipts[-1]
            device_account = Account.from_key(member.key)
            await chain.ledger.fund(device_account.address, 10**17)  # a challenge costs gas
            challenge = await chain.ledger.challenge(device_account, forced.result, forced.edge_sig)
            await _logged(caplog, f"answered challenge {challenge}")
            assert (await chain.ledger.challenge_info(challenge)).state == 2  # resolved
            assert await _refused(edge.port, stranger, enclave, chain) == ErrorCode.UNAUTHORIZED
            # registered while the edge runs: admitted from the next refresh on
            await chain.ledger.register_device(chain.fleet, chain.fleet_party, late)
            await _until(lambda: late.address in on_chain.devices)
            async with _session(edge.port, late, enclave, chain) as session:
                await session.infer(xs[0])
            # revoked: refused from the next refresh on
            await chain.ledger.revoke_device(chain.fleet, late)
            await _until(lambda: late.address not in on_chain.devices)
            assert await _refused(edge.port, late, enclave, chain) == ErrorCode.UNAUTHORIZED
        tasks = len(xs) + 1
        assert isinstance(on_chain.epoch_store, SealedEpochStore)
        epoch_state = SealedEpochStore(sealed).load()  # sealed at the first sync, then per batch
        assert journal.next_seq == tasks
        assert journal.pending == 0
        assert not journal.unanchored()
    state = await chain.ledger.edge_state(identity.address_text)
    assert state.registered
    assert state.next_seq == tasks
    last_anchored = AnchoredHead(state.next_batch_id - 1, bytes(state.head))
    assert epoch_state == EpochState(anchored=last_anchored)
    info = await chain.ledger.edge_info(identity.address_text)
    assert (info.party_id, info.quote_id, info.endpoint) == (
        chain.party, identity.quote_id, "edge.test:7443"
    )  # fmt: skip
    # a restart of the same edge re-registers, anchors nothing twice, and needs no funding
    again = dataclasses.replace(config, ledger=dataclasses.replace(settings, fund_wei=1))
    with Journal.open(tmp_path / "edge.sqlite", edge=identity.address) as journal:
        async with open_edge_ledger(
            again, identity, operator_key, journal=journal, sealed=sealed
        ) as on_chain:
            await asyncio.wait_for(on_chain.wait_connected(), 60)
            assert on_chain.funded_wei == 0
            assert on_chain.registrations == 0  # the chain already has this registration
            assert member.address in on_chain.devices
    assert (await chain.ledger.edge_state(identity.address_text)).next_seq == tasks
    await book.check(DEV_NOW)
    assert len(book.receipts) == len(xs)
    assert not book.pending
    assert await _audited(chain, identity.address, tmp_path / "audit.sqlite") == tasks


def _cli_config(tmp_path: Path, chain: Chain) -> Path:
    (tmp_path / "operator.key").write_text(bytes(chain.operator.key).hex() + "\n")
    path = tmp_path / "edge.toml"
    path.write_text(
        f"""
provider = "simulated"
state_dir = "state"
journal_dir = "journal"

[listen]
host = "127.0.0.1"
port = 0

[[models]]
zoo = "digits_cnn"
cuts = [{CUT}]
codecs = ["float32"]

[limits]
max_wait_ms = 1.0

[simulated]
mrenclave = "{DEV_MRENCLAVE.hex()}"
mrsigner = "{"a1" * 32}"
export_dir = "pki"

[ledger]
rpc = "{chain.node.url}"
contract = "{chain.ledger.address}"
operator_key_file = "operator.key"
party_id = {chain.party}
endpoint = "127.0.0.1:7443"
batch_records = 2
batch_seconds = 0.2
refresh_seconds = 0.1
"""
    )
    return path


async def _line(stdout: asyncio.StreamReader, text: str) -> str:
    """The first line (stdout and stderr) that contains ``text`` (bounded)."""
    async with asyncio.timeout(120):
        while True:
            line = (await stdout.readline()).decode()
            if not line:
                raise RuntimeError(f"the edge exited before it said {text!r}")
            if text in line:
                return line


async def _header(stdout: asyncio.StreamReader) -> dict[str, str]:
    """The ``key value`` lines the edge prints up to ``ready`` (bounded)."""
    info: dict[str, str] = {}
    async with asyncio.timeout(120):
        while "ready" not in info:
            line = (await stdout.readline()).decode().rstrip("\n")
            if not line:
                raise RuntimeError(f"edge exited early: {info}")
            key, _, value = line.partition(" ")
            info[key] = value
    return info


@pytest.mark.anvil
@pytest.mark.slow
async def test_edge_serve_cli_on_the_ledger(chain: Chain, tmp_path: Path) -> None:
    member, stranger = DeviceIdentity.generate(), DeviceIdentity.generate()
    await chain.ledger.register_device(chain.fleet, chain.fleet_party, member)
    await chain.ledger.allow_measurement(DEV_MRENCLAVE)
    # the edge serves a model only once its id is registered on the ledger
    model_id = bytes.fromhex(build_partitioner().model_id)
    await chain.ledger.register_model(chain.operator, chain.party, model_id)
    config = _cli_config(tmp_path, chain)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "secure_ci", "edge", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    xs = [torch.randn(1, 1, 32, 32) for _ in range(3)]
    try:
        info = await _header(proc.stdout)
        assert info["ledger"] == chain.ledger.address
        assert info["chain_id"] == str(chain.node.chain_id)
        assert info["party"] == str(chain.party)
        assert info["endpoint"] == "127.0.0.1:7443"
        await _line(proc.stdout, "1 devices registered")
        pki = tmp_path / "pki"
        root = x509.load_pem_x509_certificate((pki / "dev-root.pem").read_bytes())
        trust = Trust(
            Policy(roots=(root.public_bytes(Encoding.DER),), mrenclave=frozenset({DEV_MRENCLAVE})),
            Collateral.from_json((pki / "collateral.json").read_text()),
        )
        port = int(info["listening"].rpartition(":")[2])
        async with _session(port, member, trust, chain, clock=time.time) as session:
            assert len(await session.infer_many(xs)) == len(xs)
        code = await _refused(port, stranger, trust, chain, clock=time.time)
        assert code == ErrorCode.UNAUTHORIZED
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            tail = (await proc.stdout.read()).decode().splitlines()
            assert await proc.wait() == 0, tail
        assert "unanchored 0 records" in tail, tail
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 30)
    edge = info["enclave"]
    assert (await chain.ledger.edge_state(edge)).next_seq == len(xs)
    assert await _audited(chain, bytes.fromhex(edge[2:]), tmp_path / "audit.sqlite") == len(xs)
    # --anchor-only (retiring an edge): connects, anchors what its journal holds, stops
    retire = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "secure_ci", "edge", "serve", "--config", str(config),
        "--anchor-only", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(retire.communicate(), 120)
    assert retire.returncode == 0, out.decode()
    assert "then stopping" in out.decode()
    assert "unanchored 0 records" in out.decode()
    assert "recovered sealed enclave key" in out.decode()  # the same edge and journal
    assert (tmp_path / "state" / "sealed" / "epoch").is_file()  # the epoch state is sealed
    assert "listening" not in out.decode()  # it serves nothing


@pytest.mark.anvil
async def test_a_revoked_edge_keeps_its_records_and_says_why(
    chain: Chain, tmp_path: Path, caplog: pytest.LogCaptureFixture, fast_retry: None
) -> None:
    """Revoked on chain, the edge cannot anchor: it serves on, keeps every record it
    acknowledged in the journal and logs the revert with what it means."""
    enclave = dev_enclave(DEV_NOW)
    identity = create_identity(enclave.provider, now=DEV_NOW)
    member = DeviceIdentity.generate()
    await chain.ledger.register_device(chain.fleet, chain.fleet_party, member)
    await chain.ledger.allow_measurement(identity.measurement)
    settings = LedgerSettings(
        chain.node.url, bytes.fromhex(chain.ledger.address[2:]), chain.party,
        endpoint="e", batch_records=1, batch_seconds=0.05, refresh_seconds=0.05,
    )  # fmt: skip
    config = EdgeConfig(limits=EdgeLimits(max_wait_ms=1.0), journal_dir=tmp_path, ledger=settings)
    with Journal.open(tmp_path / "edge.sqlite", edge=identity.address) as journal:
        async with (
            open_edge_ledger(config, identity, bytes(chain.operator.key), journal=journal)
            as on_chain,
            open_edge(
                on_chain.edge_config, provider=enclave.provider, models=registry(),
                allowed_devices=on_chain.devices, journal=journal, identity=identity,
                clock=lambda: float(DEV_NOW),
            ) as edge,
        ):  # fmt: skip
            await asyncio.wait_for(on_chain.wait_connected(), 60)
            await chain.ledger.revoke_edge(chain.operator, identity.address_text)
            async with _session(edge.port, member, enclave, chain) as session:
                for _ in range(2):  # answered while revoked
                    await session.infer(torch.randn(1, 1, 32, 32))
            await _logged(caplog, "UnknownEdge")
            await _logged(caplog, "is revoked on the ledger")
        assert journal.next_seq == 2
        assert journal.unanchored_records == 2  # kept, never lost
    assert (await chain.ledger.edge_state(identity.address_text)).next_seq == 0
