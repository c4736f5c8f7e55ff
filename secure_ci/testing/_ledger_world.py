"""A populated SecureCILedger for tests: one party, registered edges and devices, and helpers
to sign task results and anchor them as real Merkle batches on any backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eth_account import Account
from eth_account.signers.local import LocalAccount

from secure_ci.ledger._canonical import OutputOpening, open_output
from secure_ci.ledger._chain import AnchorReceipt
from secure_ci.ledger._client import LedgerClient
from secure_ci.ledger._merkle import MerkleTree, leaf_hash
from secure_ci.ledger._records import TaskRequest, TaskResult, commitment, keccak256

__all__ = ["DisputeEvidence", "LedgerWorld", "ledger_world"]

_FUNDING = 10**19
DisputeEvidence = tuple[TaskRequest, TaskResult, bytes, OutputOpening]
"""One edge's answer to a task as a dispute takes it: (request, result, signature, opening)."""


@dataclass(frozen=True)
class LedgerWorld:
    """A party (``admin``) with registered ``edges`` and ``devices`` on ``ledger``."""

    ledger: LedgerClient
    party_id: int
    admin: LocalAccount
    edges: tuple[LocalAccount, ...]
    devices: tuple[LocalAccount, ...]
    measurement: bytes
    quote_id: bytes

    def result(self, seq: int, *, task: bytes = b"", output: bytes = b"") -> TaskResult:
        """A deterministic TaskResult with edge sequence ``seq``."""
        tag = task or seq.to_bytes(8, "big")
        return TaskResult(
            keccak256(b"task" + tag),
            keccak256(b"request" + tag),
            keccak256(b"output" + (output or tag)),
            self.measurement,
            self.quote_id,
            0,
            7,
            seq,
        )

    def redundant(
        self,
        edges: Sequence[LocalAccount],
        *,
        task: bytes = b"redundant",
        outputs: Sequence[bytes] = (b"cat", b"dog"),
        seq: int = 50,
        device: int = 0,
    ) -> list[DisputeEvidence]:
        """One task device ``device`` sent to each of ``edges``, and each edge's signed,
        opened answer ``(request, result, edge signature, opening)``, as a device holds them
        for a dispute: edge k's canonical output bytes are ``outputs[k]``."""
        device_address = bytes.fromhex(self.devices[device].address[2:])
        input_salt = keccak256(b"input salt" + task)
        answers = []
        for k, (edge, output) in enumerate(zip(edges, outputs, strict=True)):
            request = TaskRequest(
                task_id=keccak256(b"task" + task),
                device=device_address,
                device_seq=1,
                model_id=keccak256(b"model"),
                cut=3,
                input_commitment=commitment(input_salt, b"input" + task),
                edge=bytes.fromhex(edge.address[2:]),
                deadline=2**40,
            )
            opening = open_output(bytes([k + 2]) * 32, input_salt, output, b"payload" + output)
            result = TaskResult(
                request.task_id, request.struct_hash(), opening.commitment(), self.measurement,
                self.quote_id, 0, 7, seq + k,
            )  # fmt: skip
            answers.append((request, result, self.sign(edge, result), opening))
        return answers

    def sign(self, edge: LocalAccount, result: TaskResult) -> bytes:
        """The edge's EIP-712 signature over ``result`` on this ledger's domain."""
        return result.sign(bytes(edge.key), self.ledger.domain)

    def tree(self, results: Sequence[TaskResult]) -> MerkleTree:
        """The batch tree of ``results`` (leaves carry their edge sequence numbers)."""
        domain = self.ledger.domain
        return MerkleTree.build([leaf_hash(r.edge_seq, r.digest(domain)) for r in results])

    async def anchor(
        self, edge: LocalAccount, results: Sequence[TaskResult], records: bytes = b""
    ) -> tuple[int, MerkleTree, AnchorReceipt]:
        """Anchor ``results`` as the edge's next batch; (batch id, tree, receipt)."""
        state = await self.ledger.edge_state(edge.address)
        tree = self.tree(results)
        receipt = await self.ledger.anchor_batch(
            edge, state.next_batch_id, tree.root, state.next_seq, len(results), state.head, records
        )
        return state.next_batch_id, tree, receipt


def _account(label: bytes, seed: int, index: int) -> LocalAccount:
    account: LocalAccount = Account.from_key(
        keccak256(label + seed.to_bytes(8, "big") + bytes([index]))
    )
    return account


async def ledger_world(
    ledger: LedgerClient, *, edges: int = 2, devices: int = 2, seed: int = 0
) -> LedgerWorld:
    """Register a party, an allowed measurement, ``edges`` edges and ``devices`` devices."""
    admin = _account(b"secure-ci test admin", seed, 0)
    edge_accounts = tuple(_account(b"secure-ci test edge", seed, i) for i in range(edges))
    device_accounts = tuple(_account(b"secure-ci test device", seed, i) for i in range(devices))
    for account in (admin, *edge_accounts, *device_accounts):
        await ledger.fund(account.address, _FUNDING)
    party_id = await ledger.register_party(admin.address)
    measurement = keccak256(b"measurement" + seed.to_bytes(8, "big"))
    quote_id = keccak256(b"quote" + seed.to_bytes(8, "big"))
    await ledger.allow_measurement(measurement)
    for i, edge in enumerate(edge_accounts):
        endpoint = f"127.0.0.1:{9000 + i}"
        await ledger.register_edge(admin, party_id, edge, measurement, quote_id, endpoint)
    for device in device_accounts:
        await ledger.register_device(admin, party_id, device)
    return LedgerWorld(
        ledger, party_id, admin, edge_accounts, device_accounts, measurement, quote_id
    )
