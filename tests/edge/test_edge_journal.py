"""The edge journals every answered task in the ledger's write-ahead journal before replying."""

from __future__ import annotations

from pathlib import Path

import torch
from edge_helpers import CUT, build_partitioner, registry

from secure_ci.edge import EdgeConfig, EdgeLimits, create_identity, open_edge
from secure_ci.ledger._journal import Journal
from secure_ci.ledger._records import LedgerDomain, address_of
from secure_ci.partition import encode_features
from secure_ci.protocol import InferResult
from secure_ci.testing import DEV_NOW, RawDevice, dev_enclave, new_device_key


async def test_results_are_durably_journaled_with_consecutive_sequence(tmp_path: Path) -> None:
    enclave = dev_enclave(DEV_NOW)
    key = new_device_key()
    identity = create_identity(enclave.provider, now=DEV_NOW)
    config = EdgeConfig(
        limits=EdgeLimits(max_wait_ms=1.0),
        allowed_devices=frozenset({address_of(key)}),
        chain_id=31337,
        contract=b"\x11" * 20,
    )
    head, _ = build_partitioner().split(CUT)
    model_id = bytes.fromhex(build_partitioner().model_id)
    path = tmp_path / "journal.sqlite"
    with Journal.open(path, edge=identity.address) as journal:
        async with open_edge(
            config,
            provider=enclave.provider,
            models=registry(),
            journal=journal,
            identity=identity,
            clock=lambda: float(DEV_NOW),
        ) as edge:
            device = await RawDevice.connect(
                edge.port,
                enclave=enclave,
                key=key,
                domain=LedgerDomain(31337, b"\x11" * 20),
                now_fn=lambda: DEV_NOW,
            )
            await device.handshake()
            with torch.inference_mode():
                payload = encode_features(head(torch.randn(1, 1, 32, 32)), "float16")
            requests = [
                device.request(payload, model_id=model_id, cut=CUT, codec="float16")
                for _ in range(5)
            ]
            for r in requests:
                await device.send(r)
            seqs = []
            for _ in requests:
                event = await device.receive()
                assert isinstance(event, InferResult)
                seqs.append(event.edge_seq)
            await device.aclose()
        assert sorted(seqs) == list(range(5))
        assert journal.next_seq == 5
        stored = journal.entries(0, 5)
    domain = LedgerDomain(31337, b"\x11" * 20)
    assert {e.request.task_id for e in stored} == {r.task_id for r in requests}
    for entry in stored:
        assert entry.result.recover(entry.edge_sig, domain) == identity.address
        assert entry.request.recover(entry.device_sig, domain) == address_of(key)
        assert entry.result.matches(entry.request)
    with Journal.open(path, edge=identity.address) as reopened:
        assert reopened.next_seq == 5


async def test_a_replay_to_the_restarted_edge_is_refused(tmp_path: Path) -> None:
    """The replay memory survives a restart: it is seeded from the journal's live requests."""
    from secure_ci.protocol import Error, ErrorCode

    enclave = dev_enclave(DEV_NOW)
    key = new_device_key()
    identity = create_identity(enclave.provider, now=DEV_NOW)
    config = EdgeConfig(
        limits=EdgeLimits(max_wait_ms=1.0), allowed_devices=frozenset({address_of(key)})
    )
    head, _ = build_partitioner().split(CUT)
    model_id = bytes.fromhex(build_partitioner().model_id)
    with torch.inference_mode():
        payload = encode_features(head(torch.randn(1, 1, 32, 32)), "float16")
    sent = None
    for run in range(2):
        with Journal.open(tmp_path / "j.sqlite", edge=identity.address) as journal:
            async with open_edge(
                config, provider=enclave.provider, models=registry(), journal=journal,
                identity=identity, clock=lambda: float(DEV_NOW),
            ) as edge:  # fmt: skip
                device = await RawDevice.connect(
                    edge.port, enclave=enclave, key=key, now_fn=lambda: DEV_NOW
                )
                await device.handshake()
                if sent is None:
                    sent = device.request(payload, model_id=model_id, cut=CUT, codec="float16")
                await device.send(sent)  # the same signed request, once per run
                answer = await device.receive()
                await device.aclose()
        if run == 0:
            assert isinstance(answer, InferResult)
        else:
            assert isinstance(answer, Error)
            assert answer.code == ErrorCode.REPLAY
    with Journal.open(tmp_path / "j.sqlite", edge=identity.address) as journal:
        assert journal.next_seq == 1  # answered once


async def test_requests_without_a_deadline_or_too_far_out_are_refused(tmp_path: Path) -> None:
    from secure_ci.protocol import Error, ErrorCode

    enclave = dev_enclave(DEV_NOW)
    key = new_device_key()
    config = EdgeConfig(
        limits=EdgeLimits(max_wait_ms=1.0, max_deadline_seconds=600),
        allowed_devices=frozenset({address_of(key)}),
    )
    head, _ = build_partitioner().split(CUT)
    model_id = bytes.fromhex(build_partitioner().model_id)
    with torch.inference_mode():
        payload = encode_features(head(torch.randn(1, 1, 32, 32)), "float16")
    async with open_edge(
        config, provider=enclave.provider, models=registry(), clock=lambda: float(DEV_NOW)
    ) as edge:
        device = await RawDevice.connect(
            edge.port, enclave=enclave, key=key, now_fn=lambda: DEV_NOW
        )
        await device.handshake()
        for deadline, code in ((0, ErrorCode.TIMEOUT), (DEV_NOW + 601, ErrorCode.MALFORMED)):
            request = device.request(
                payload, model_id=model_id, cut=CUT, codec="float16", deadline=deadline
            )
            await device.send(request)
            answer = await device.receive()
            assert isinstance(answer, Error)
            assert answer.code == code
        await device.send(device.request(payload, model_id=model_id, cut=CUT, codec="float16"))
        assert isinstance(await device.receive(), InferResult)
        await device.aclose()
