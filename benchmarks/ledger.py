"""Ledger benchmark: records anchored per second per edge, gas per task, single-task audit.

``records_per_s``: end to end on one edge — build the result, enclave signature, durable
journal (group commits of ``GROUP`` records, fsync each), close batches of ``BATCH`` records,
encode calldata, anchor on the chain (in-process py-evm and, when installed, anvil). Device
request signatures are made beforehand (devices sign, not the edge), by 16 devices whose
requests are chained as the device library chains them. The enclave key signs in
``SIGNING_WORKERS`` worker process(es) (``secure_ci.ledger._signing``), up to ``SIGN_AHEAD``
groups ahead, while this process builds, journals and anchors; the worker starts with the
edge, before the clock. ``records_per_cpu_s`` divides by the CPU time of this process plus
its signing worker instead of wall time (the machine is shared). The edge journals the next
group while the previous group's fsync and the anchoring transaction are in flight; a record
counts as durable once its group commit returned.
``gas_per_task``: gas of the anchoring transactions divided by the records they carry:
``prague`` on the chains' default fork (EIP-7623's calldata floor: 40 gas per non-zero byte),
``cancun`` measured on anvil started with ``--hardfork cancun`` (16 gas per non-zero byte;
None without anvil), ``cancun_derived`` computed from the calldata and the execution gas (a
cross-check that needs no second chain). ``BATCH`` records per anchoring transaction keeps a
transaction under 16.7 M gas at Prague prices (EIP-7825's per-transaction cap, due with Osaka)
and half the 30 M block gas limit of py-evm and anvil.
``audit_verify_ms``: one ``AuditIndex.verify`` among ``records`` anchored records: indexed
lookup, leaf rebuilt, proof checked against the batch root the chain anchored (read from the
chain when the index was synced; anchored roots never change), device signature (through
the request chain where the batch left it out), the measurement anchored with the batch.
``live_chain`` re-reads the batch (root, measurement) from the node for every audit (one
JSON-RPC round trip). ``by_devices_per_batch``: calldata and floor gas
per task when a batch's records come from more devices.
``integrity_gas``: gas of holding an edge to what it published, on the main chain: a fraud
proof against a ``BATCH``-record batch (16 devices) whose calldata does not rebuild its root
(the worst case: every record decoded and hashed, the tree rebuilt) and against one whose
calldata is cut short (found at the end of the walk); a request-only challenge opened with a
device's signed request and answered with the anchored record and its positional proof in a
``BATCH``-record batch.
``governance``: gas per governance step (propose, approve, execute, suspend, lift) and the
time a warm release check adds to a device's connect (see ``_governance``).
``dispute_gas``: gas of a dispute that opens the output commitments of k = 2, 3 and 8
results of one task (see ``_dispute``).
Sizes (records anchored for throughput, records in the audit index, audits timed): ``full``
(20,000, 1,000,000, 200), ``quick`` (10,000, 20,000, 200), ``smoke`` (2,000, 2,000, 20: one
full batch each, the smallest run that still anchors a batch, builds the index and audits).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from _dispute import dispute_gas
from _governance import governance_figures
from eth_abi import encode as abi_encode
from eth_account import Account

from secure_ci.ledger import find_anvil, open_ledger, run_anvil
from secure_ci.ledger._anchor import Anchorer
from secure_ci.ledger._audit import AuditIndex
from secure_ci.ledger._calldata import BatchRecords, encode_batch
from secure_ci.ledger._chain import as_task_request
from secure_ci.ledger._journal import Journal, JournalEntry, sign_entry
from secure_ci.ledger._merkle import MerkleTree, leaf_hash
from secure_ci.ledger._records import LedgerDomain, TaskRequest, TaskResult, keccak256
from secure_ci.ledger._signing import SigningPool
from secure_ci.testing import ledger_world, sample_requests, sample_tasks

BATCH = 2000
GROUP = 256
SIGN_AHEAD = 4  # groups handed to the signing worker before the oldest is journaled
SIGNING_WORKERS = 1  # the enclave key's signing processes (the machine has 2 cores)
MEASUREMENT = b"\x11" * 32
QUOTE_ID = b"\x22" * 32
ANCHOR_SELECTOR = keccak256(b"anchorBatch(uint64,bytes32,uint64,uint32,bytes32,bytes)")[:4]
SIZES = {  # records anchored for throughput, records in the audit index, audits timed
    "smoke": (BATCH, BATCH, 20),
    "quick": (5 * BATCH, 20_000, 200),
    "full": (10 * BATCH, 1_000_000, 200),
}
TARGETS = {"records_per_s": 10_000, "gas_per_task": 4_000, "audit_p50_ms": 5.0}


def _requests(
    n: int, domain: LedgerDomain, edge: bytes, first: int = 0
) -> list[tuple[TaskRequest, bytes]]:
    """Signed requests of 16 devices, each chained as the device library chains them."""
    return sample_requests(n, edge=edge, domain=domain, first_seq=first, devices=16)


async def _registered(ledger: Any, edge: Any) -> None:
    admin = Account.create()
    for who in (admin, edge):
        await ledger.fund(who.address, 10**21)
    party = await ledger.register_party(admin.address)
    await ledger.allow_measurement(MEASUREMENT)
    await ledger.register_edge(admin, party, edge, MEASUREMENT, QUOTE_ID, "bench:1")


async def _edge_pipeline(
    ledger: Any,
    edge: Any,
    journal: Journal,
    requests: list[tuple[TaskRequest, bytes]],
    signing: SigningPool | None = None,
) -> tuple[float, int]:
    """Run the edge's record path over ``requests``; (seconds, gas used).

    The anchorer runs as it does in the edge, in the same TaskGroup as the producer, so an
    external node (anvil) executes a batch while the edge signs and journals the next ones.
    Groups are signed by ``signing`` (inline without one) up to ``SIGN_AHEAD`` groups ahead
    of the journal, so a signing worker runs while this loop builds, journals and anchors.
    """
    domain = ledger.domain
    pool = signing or SigningPool(edge.key, workers=0)  # inline: no process, nothing to close
    anchorer = Anchorer(journal, ledger, edge, max_records=BATCH, max_seconds=0.5)
    first, stop = journal.next_seq, asyncio.Event()
    signed: deque[tuple[list[tuple[TaskRequest, bytes, TaskResult, bytes]], Future[list[bytes]]]]
    signed = deque()
    commit: asyncio.Future[None] | None = None

    async def journal_next() -> None:
        # group commit, pipelined: the previous group's fsync ran in a worker thread while
        # later groups were built and signed; once it returns its records may be acknowledged
        nonlocal commit
        group, signatures = signed.popleft()
        entries = [
            JournalEntry(request, result, device_sig, edge_sig, digest)
            for (request, device_sig, result, digest), edge_sig in zip(
                group, await asyncio.wrap_future(signatures), strict=True
            )
        ]
        if commit is not None:
            await commit
        commit = asyncio.ensure_future(asyncio.to_thread(journal.append_many, entries))

    start = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(anchorer.run(poll_seconds=0.005, stop=stop))
        for i in range(0, len(requests), GROUP):
            group = []
            for j, (request, device_sig) in enumerate(requests[i : i + GROUP]):
                result = TaskResult(
                    request.task_id, request.struct_hash(), keccak256(request.input_commitment),
                    MEASUREMENT, QUOTE_ID, 0, 7, first + i + j,
                )  # fmt: skip
                group.append((request, device_sig, result, result.digest(domain)))
            signed.append((group, pool.submit([digest for *_, digest in group])))
            while signed and (len(signed) > SIGN_AHEAD or signed[0][1].done()):
                await journal_next()
            await asyncio.sleep(0)  # the anchorer's turn
        while signed:
            await journal_next()
        if commit is not None:
            await commit
        stop.set()
    return time.perf_counter() - start, anchorer.gas_used


def _tokens(records: bytes) -> int:
    """EIP-7623 calldata tokens of an anchorBatch transaction carrying ``records``."""
    data = ANCHOR_SELECTOR + abi_encode(
        ["uint64", "bytes32", "uint64", "uint32", "bytes32", "bytes"],
        [1, b"\xaa" * 32, 1, 1, b"\xbb" * 32, records],
    )
    zeros = data.count(0)
    return zeros + 4 * (len(data) - zeros)


def _calldata(journal: Journal, batch_id: int) -> bytes:
    batch = journal.batch(batch_id)
    entries = journal.entries(batch.first_seq, batch.count)
    return encode_batch(
        BatchRecords(journal.edge, batch.first_seq, tuple(e.anchored() for e in entries))
    )


async def _throughput(backend: str, n: int, workdir: Path) -> dict[str, float]:
    edge = Account.create()
    async with open_ledger(backend) as ledger:
        await _registered(ledger, edge)
        edge_bytes = bytes.fromhex(edge.address[2:])
        requests = _requests(n + 2, ledger.domain, edge_bytes)
        path = workdir / f"edge-{backend.replace('/', '_').replace(':', '_')}.db"
        with Journal.open(path, edge=edge_bytes) as journal:
            # two one-record batches: the second gives the execution gas of anchorBatch
            warm = Anchorer(journal, ledger, edge, max_records=1)
            for request, device_sig in requests[:2]:
                result = TaskResult(
                    request.task_id, request.struct_hash(), request.input_commitment,
                    MEASUREMENT, QUOTE_ID, 0, 7, journal.next_seq,
                )  # fmt: skip
                journal.append(sign_entry(request, device_sig, result, edge.key, ledger.domain))
            small = (await warm.flush())[1].gas_used
            execution = small - 21_000 - 4 * _tokens(_calldata(journal, 1))
            with SigningPool(edge.key, workers=SIGNING_WORKERS) as signing:
                signing.start()  # the edge starts its signing worker with the service
                cpu = time.process_time()
                seconds, gas = await _edge_pipeline(ledger, edge, journal, requests[2:], signing)
                cpu = time.process_time() - cpu + signing.cpu_seconds
            tokens = _tokens(_calldata(journal, 2))
            size = len(_calldata(journal, 2))
    return {
        "records_per_s": n / seconds,
        "records_per_cpu_s": n / cpu,
        "gas_per_task": gas / n,
        "gas_per_task_cancun_derived": (21_000 + 4 * tokens + execution) / BATCH,
        "calldata_bytes_per_task": size / BATCH,
    }


async def _audit(backend: str, records: int, samples: int, workdir: Path) -> dict[str, Any]:
    edge = Account.create()
    async with open_ledger(backend) as ledger:
        await _registered(ledger, edge)
        edge_bytes = bytes.fromhex(edge.address[2:])
        build = time.perf_counter()
        task_ids: list[bytes] = []
        with Journal.open(workdir / "audit-edge.db", edge=edge_bytes) as journal:
            for first in range(0, records, 20 * BATCH):
                chunk = _requests(
                    min(20 * BATCH, records - first), ledger.domain, edge_bytes, first
                )
                task_ids.extend(request.task_id for request, _ in chunk)
                await _edge_pipeline(ledger, edge, journal, chunk)
        anchored = time.perf_counter() - build
        with AuditIndex(workdir / "audit.db", ledger.domain) as index:
            start = time.perf_counter()
            await index.sync(ledger, [edge.address])
            index_s = time.perf_counter() - start
            rng = random.Random(1)
            fresh: list[float] = []
            offline: list[float] = []
            proof_bytes = []
            for _ in range(samples):
                task_id = rng.choice(task_ids)
                for chain, times in ((ledger, fresh), (None, offline)):
                    start = time.perf_counter()
                    (verified,) = await index.verify(task_id, chain)
                    times.append((time.perf_counter() - start) * 1000)
                proof_bytes.append(32 * len(verified.proof))
            count = index.count()

    def pct(times: list[float]) -> dict[str, float]:
        times = sorted(times)
        return {"p50": statistics.median(times), "p95": times[int(0.95 * (len(times) - 1))]}

    return {
        "audit_verify_ms": {
            **pct(offline),
            "records": count,
            "samples": samples,
            "backend": "anvil" if backend.startswith("http") else backend,
            "live_chain": pct(fresh),
            "index_build_s": index_s,
            "anchor_build_s": anchored,
        },
        "proof_bytes": statistics.mean(proof_bytes),
    }


def _gas_by_devices() -> dict[str, dict[str, float]]:
    """Calldata bytes and Prague floor gas per task when a batch's ``BATCH`` records come from
    more devices (shorter request chains, more chain starts and kept signatures). The floor
    (``21000 + 10 * tokens``) is what an anchoring transaction pays: its execution gas is far
    below the calldata floor."""
    out = {}
    domain, key = LedgerDomain(1, b"\x01" * 20), keccak256(b"bench-edge")
    for devices in (16, 200, 1000, BATCH):
        entries = sample_tasks(BATCH, edge_key=key, domain=domain, devices=devices)
        data = encode_batch(
            BatchRecords(entries[0].request.edge, 0, tuple(e.anchored() for e in entries))
        )
        out[str(devices)] = {
            "calldata_bytes_per_task": len(data) / BATCH,
            "prague_gas_per_task": (21_000 + 10 * _tokens(data)) / BATCH,
        }
    return out


async def _integrity_gas(backend: str) -> dict[str, Any]:
    """Gas of fraud proofs and of a request-only challenge (see the module docstring)."""
    from dataclasses import replace

    async with open_ledger(backend) as ledger:
        world = await ledger_world(ledger, edges=3, devices=1, seed=77)
        domain, prover = ledger.domain, world.admin
        fraud: dict[str, int] = {}
        for name, edge in (("root_mismatch", world.edges[0]), ("truncated", world.edges[1])):
            entries = sample_tasks(
                BATCH, edge_key=bytes(edge.key), domain=domain, devices=16,
                measurement=world.measurement, quote_id=world.quote_id,
            )  # fmt: skip
            root = MerkleTree.build([leaf_hash(e.result.edge_seq, e.record_hash) for e in entries])
            records = [e.anchored() for e in entries]
            k = BATCH // 2  # one output commitment changed in the published records
            records[k] = replace(
                records[k],
                result=replace(records[k].result, output_commitment=keccak256(b"forged")),
            )
            data = encode_batch(BatchRecords(bytes.fromhex(edge.address[2:]), 0, tuple(records)))
            if name == "truncated":
                data = data[:-1]
            await ledger.anchor_batch(edge, 0, root.root, 0, BATCH, bytes(32), data)
            _, fraud[name] = await ledger.prove_fraud_gas(prover, edge.address, 0, data)
        edge, device = world.edges[2], world.devices[0]
        device_addr, edge_addr = (bytes.fromhex(a.address[2:]) for a in (device, edge))
        request = TaskRequest(
            keccak256(b"bench task"), device_addr, 0, keccak256(b"model"), 3,
            keccak256(b"input"), edge_addr, 2**40, bytes(32),
        )  # fmt: skip
        others = sample_tasks(BATCH, edge_key=bytes(edge.key), domain=domain, devices=16)
        k = 1234
        result = TaskResult(
            request.task_id, request.struct_hash(), keccak256(b"output"), world.measurement,
            world.quote_id, 0, 7, k,
        )  # fmt: skip
        hashes = [e.record_hash for e in others]
        hashes[k] = result.digest(domain)
        tree = MerkleTree.build([leaf_hash(i, h) for i, h in enumerate(hashes)])
        await ledger.anchor_batch(edge, 0, tree.root, 0, BATCH, bytes(32), b"")
        fn = ledger._contract.functions.challengeRequest(
            as_task_request(request), request.sign(bytes(device.key), domain)
        )
        opened = await ledger._transact(device, fn)
        challenge_id = int(ledger._event_args("RequestChallengeOpened", opened)["challengeId"])
        answer = await ledger.answer_request(edge, challenge_id, result, 0, tree.proof(k))
    return {
        "fraud_proof_gas": {**fraud, "records": BATCH},
        "request_challenge_gas": {
            "open": int(opened["gasUsed"]),
            "answer": answer,
            "proof_length": len(tree.proof(k)),
        },
    }


async def _cancun_gas(n: int, workdir: Path) -> float:
    """Gas per task measured on anvil with the Cancun rules (16 gas per non-zero calldata
    byte, before EIP-7623's calldata floor of Prague, which the project's chains run)."""
    with run_anvil(hardfork="cancun") as node:
        return (await _throughput(node.url, n, workdir))["gas_per_task"]


async def _main(size: str) -> dict[str, Any]:
    n, audit_records, samples = SIZES[size]
    out: dict[str, Any] = {"batch_size": BATCH, "group_commit": GROUP, "size": size}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        by_backend: dict[str, dict[str, float] | None] = {"inprocess": None, "anvil": None}
        by_backend["inprocess"] = await _throughput("inprocess", n, workdir)
        cancun: float | None = None
        if find_anvil() is not None:
            with run_anvil() as node:
                by_backend["anvil"] = await _throughput(node.url, n, workdir)
                out.update(await _audit(node.url, audit_records, samples, workdir))
                out["integrity_gas"] = await _integrity_gas(node.url)
                out["dispute_gas"] = await dispute_gas(node.url)
            cancun = await _cancun_gas(min(n, 5 * BATCH), workdir)
        else:
            out.update(await _audit("inprocess", audit_records, samples, workdir))
            out["integrity_gas"] = await _integrity_gas("inprocess")
            out["dispute_gas"] = await dispute_gas("inprocess")
    main = by_backend["anvil"] or by_backend["inprocess"]
    assert main is not None
    for key in ("records_per_s", "records_per_cpu_s"):
        out[key] = {name: (v[key] if v else None) for name, v in by_backend.items()}
    out["gas_per_task"] = {
        "prague": main["gas_per_task"],
        "cancun": cancun,
        "cancun_derived": main["gas_per_task_cancun_derived"],
    }
    out["calldata_bytes_per_task"] = main["calldata_bytes_per_task"]
    out["by_devices_per_batch"] = _gas_by_devices()
    out["governance"] = await governance_figures(size)
    out["targets"] = TARGETS
    out["quick"] = size != "full"
    return out


def run(*, quick: bool, size: str | None = None) -> dict[str, Any]:
    """Measure at ``size`` (``smoke``, ``quick``, ``full``; default from ``quick``)."""
    return asyncio.run(_main(size or ("quick" if quick else "full")))


def plot(result: dict[str, Any], path: Path) -> None:
    """Throughput per backend, gas per task, calldata by devices per batch, audit latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    (rate, gas), (devices, audit) = axes
    backends = [b for b, v in result["records_per_s"].items() if v is not None]
    width = 0.4
    xs = range(len(backends))
    wall = [result["records_per_s"][b] for b in backends]
    cpu = [result["records_per_cpu_s"][b] for b in backends]
    rate.bar([x - width / 2 for x in xs], wall, width, label="per wall-clock s")
    rate.bar([x + width / 2 for x in xs], cpu, width, label="per CPU s")
    rate.axhline(TARGETS["records_per_s"], color="red", linestyle=":", label="target")
    rate.set_xticks(list(xs), backends)
    rate.set_ylabel("records anchored / s (one edge)")
    rate.set_title("Anchoring throughput, signatures included")
    rate.legend(fontsize=8)
    rules = {k: v for k, v in result["gas_per_task"].items() if v is not None}
    gas.bar(list(rules), list(rules.values()), color="tab:green")
    gas.axhline(TARGETS["gas_per_task"], color="red", linestyle=":", label="target")
    gas.set_ylabel("gas per task")
    gas.set_title(f"Gas per task ({result['calldata_bytes_per_task']:.0f} calldata bytes/task)")
    gas.legend(fontsize=8)
    by = result["by_devices_per_batch"]
    counts = list(by)
    gas_by = [by[c]["prague_gas_per_task"] for c in counts]
    bytes_by = [by[c]["calldata_bytes_per_task"] for c in counts]
    devices.plot(counts, gas_by, marker="o", label="Prague gas / task")
    twin = devices.twinx()
    twin.plot(counts, bytes_by, marker="s", color="tab:orange", label="calldata bytes / task")
    devices.set_xlabel(f"devices in a batch of {result['batch_size']}")
    devices.set_ylabel("gas per task")
    twin.set_ylabel("calldata bytes per task")
    devices.set_title("Cost by devices per batch")
    devices.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    verify = result["audit_verify_ms"]
    kinds = {"offline index": verify, "live chain": verify["live_chain"]}
    audit.bar([f"{k}\np50" for k in kinds], [v["p50"] for v in kinds.values()])
    audit.bar([f"{k}\np95" for k in kinds], [v["p95"] for v in kinds.values()])
    audit.axhline(TARGETS["audit_p50_ms"], color="red", linestyle=":", label="p50 target")
    audit.set_ylabel("ms per audited task")
    audit.set_title(f"Audit of one task among {verify['records']:,} ({verify['backend']})")
    audit.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
