"""Nothing secret leaves the enclave: a canary planted in the features and the outputs of
1,000 tasks is found zero times in the journal, the debug logs, temporary files and the chain.

The model echoes its input, so the canary crosses the boundary as features (float32, the
codec that leaks most if anything leaks) and comes back as the output. Only salted
commitments of either may leave the enclave.
"""

from __future__ import annotations

import logging
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from eth_account import Account
from torch import nn

from secure_ci.device import DeviceIdentity, open_session
from secure_ci.edge import (
    EdgeConfig,
    EdgeLimits,
    ModelRegistry,
    create_identity,
    open_edge,
    tails_from_partitioner,
)
from secure_ci.ledger import Anchorer, Journal, open_ledger
from secure_ci.partition import Partitioner, PartitionPlan, encode_features
from secure_ci.testing import DEV_NOW, dev_enclave

TASKS = 1000
CANARY = (271828.1875, -314159.25)  # exact in float32: the bytes travel as they are
PATTERN = struct.pack("<ff", *CANARY)


class Echo(nn.Module):
    """Features out as they came in: ``x * 1`` on the device, ``+ 0`` on the edge."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 1.0) + 0.0


def _needles() -> list[bytes]:
    return [PATTERN, PATTERN.hex().encode(), struct.pack(">ff", *CANARY), repr(CANARY[0]).encode()]


def _found_in(paths: list[Path]) -> list[str]:
    hits = []
    for path in paths:
        data = path.read_bytes()
        hits += [f"{path}: {needle!r}" for needle in _needles() if needle in data]
    return hits


async def test_a_canary_in_features_and_outputs_leaves_no_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    (tmp_path / "journal").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    log_file = tmp_path / "debug.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    monkeypatch.setattr(root, "level", logging.DEBUG)
    model = Echo()
    x = torch.tensor([[CANARY[0], CANARY[1]] * 8])  # one sample of 16 values
    assert PATTERN in encode_features((x,), "float32")  # the needle is what travels
    partitioner = Partitioner(model, (x,))
    cut = next(c.index for c in partitioner.cuts if c.index >= 0)
    models = ModelRegistry()
    for tail in tails_from_partitioner(partitioner, [cut], ["float32"]):
        models.add(tail)
    enclave = dev_enclave(DEV_NOW)
    identity = create_identity(enclave.provider, now=DEV_NOW)
    device = DeviceIdentity(bytes(range(7, 39)))
    try:
        async with open_ledger("inprocess") as ledger:
            admin = Account.create()
            await ledger.fund(admin.address, 10**19)
            party = await ledger.register_party(admin.address)
            await ledger.allow_measurement(identity.measurement)
            enclave_account = Account.from_key(identity.signing_key)
            await ledger.register_edge(
                admin, party, enclave_account, identity.measurement, identity.quote_id, "e:1"
            )
            await ledger.fund(enclave_account.address, 10**19)
            config = EdgeConfig(
                limits=EdgeLimits(max_wait_ms=1.0), allowed_devices=frozenset({device.address}),
                chain_id=ledger.chain_id, contract=ledger.domain.contract,
            )  # fmt: skip
            with Journal.open(tmp_path / "journal" / "edge.sqlite", edge=identity.address) as j:
                async with open_edge(
                    config, provider=enclave.provider, models=models, journal=j,
                    identity=identity, clock=lambda: float(DEV_NOW),
                ) as edge, open_session(
                    f"127.0.0.1:{edge.port}", policy=enclave.policy,
                    collateral=enclave.collateral, identity=device, model=model,
                    plan=PartitionPlan(partitioner.model_id, cut, "float32"), example_input=x,
                    ledger_domain=ledger.domain, clock=lambda: float(DEV_NOW),
                ) as session:  # fmt: skip
                    outputs = await session.infer_many([x] * TASKS)
                assert all(torch.equal(o, x) for o in outputs)  # the canary made the round trip
                await Anchorer(j, ledger, enclave_account, max_records=256).flush()
                assert j.unanchored_records == 0
            w3 = ledger._w3
            chain = bytearray()
            for number in range(int(await w3.eth.block_number) + 1):
                block = await w3.eth.get_block(number, full_transactions=True)
                for tx in block["transactions"]:
                    chain += bytes(tx.get("input", tx.get("data", b"")))
    finally:
        root.removeHandler(handler)
        handler.close()
    assert len(chain) > TASKS * 64  # every record is on chain
    assert not [n for n in _needles() if n in chain]
    assert log_file.stat().st_size > 0  # debug logging was on
    journal_files = sorted((tmp_path / "journal").iterdir())
    temp_files = [p for p in temp.rglob("*") if p.is_file()]
    assert not _found_in([log_file, *journal_files, *temp_files])
