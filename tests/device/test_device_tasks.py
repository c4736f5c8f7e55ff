"""Device-side records, identity and address parsing (no network)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.device import (
    DEFAULT_DOMAIN,
    DeviceIdentity,
    EnclaveBinding,
    parse_edge_address,
    sign_request,
    verify_result,
)
from secure_ci.exceptions import ConfigError, SignatureError
from secure_ci.ledger import open_output
from secure_ci.ledger._records import TaskResult, address_of, commitment
from secure_ci.partition import DEFAULT_CANONICAL, CanonicalRule, canonical_bytes, encode_features
from secure_ci.protocol import InferResult, channel_binding

ENCLAVE_KEY = b"\x07" * 32
ENCLAVE = EnclaveBinding(address_of(ENCLAVE_KEY), b"\x01" * 32, b"\x02" * 32)
OUTPUT = encode_features([torch.tensor([[0.1, 0.9, 0.3, 0.9]])], "float32")


def _signed_pair(
    identity: DeviceIdentity,
    rule: CanonicalRule = DEFAULT_CANONICAL,
    canonical: bytes | None = None,
) -> tuple[object, object, InferResult]:
    """A signed request and an enclave's answer whose commitment opens to ``canonical``
    (default: the output's canonical bytes under ``rule``)."""
    event, record = sign_request(
        identity,
        enclave=ENCLAVE,
        domain=DEFAULT_DOMAIN,
        task_id=b"\x10" * 32,
        model_id=b"\x11" * 32,
        cut=2,
        codec="int8",
        device_seq=7,
        deadline=100,
        salt=b"\x12" * 32,
        payload=b"features",
    )
    result_record = TaskResult(
        task_id=record.task_id,
        request_hash=record.struct_hash(),
        output_commitment=open_output(
            b"\x13" * 32,
            b"\x12" * 32,
            canonical_bytes(rule, OUTPUT) if canonical is None else canonical,
            OUTPUT,
        ).commitment(),
        measurement=ENCLAVE.measurement,
        quote_id=ENCLAVE.quote_id,
        status=0,
        latency_ms=3,
        edge_seq=9,
    )
    result = InferResult(
        task_id=record.task_id,
        status=0,
        payload=OUTPUT,
        salt=b"\x13" * 32,
        edge_seq=9,
        latency_ms=3,
        signature=result_record.sign(ENCLAVE_KEY, DEFAULT_DOMAIN),
    )
    return event, record, result


def test_signed_request_recovers_to_the_device_and_commits_to_the_payload() -> None:
    identity = DeviceIdentity.generate()
    event, record, _ = _signed_pair(identity)
    assert record.recover(event.signature, DEFAULT_DOMAIN) == identity.address  # type: ignore[attr-defined]
    assert record.input_commitment == commitment(b"\x12" * 32, b"features")  # type: ignore[attr-defined]
    assert record.edge == ENCLAVE.address  # type: ignore[attr-defined]


def test_valid_result_becomes_a_receipt() -> None:
    event, record, result = _signed_pair(DeviceIdentity.generate())
    receipt = verify_result(result, event, record, enclave=ENCLAVE, domain=DEFAULT_DOMAIN)  # type: ignore[arg-type]
    assert receipt.result.matches(receipt.request)
    assert receipt.output_salt == b"\x13" * 32
    assert receipt.opening is not None
    assert receipt.opening.commitment() == receipt.result.output_commitment
    assert receipt.opening.salt == b"\x13" * 32


def test_the_commitment_must_open_to_the_canonical_output_under_the_models_rule() -> None:
    """The device recomputes the canonical digest from the payload: an edge that commits to
    another canonical output (or under another rule) is refused."""
    identity = DeviceIdentity.generate()
    top2 = CanonicalRule("topk", k=2)
    event, record, result = _signed_pair(identity, top2)
    receipt = verify_result(
        result, event, record, enclave=ENCLAVE, domain=DEFAULT_DOMAIN, canonical=top2
    )  # type: ignore[arg-type]
    assert receipt.opening is not None
    with pytest.raises(SignatureError):  # the default rule (top-1) gives other bytes
        verify_result(result, event, record, enclave=ENCLAVE, domain=DEFAULT_DOMAIN)  # type: ignore[arg-type]
    lie = DEFAULT_CANONICAL.encode([np.array([[1.0, 0.0, 0.0, 0.0]])])  # "label 0"
    event, record, result = _signed_pair(identity, canonical=lie)
    with pytest.raises(SignatureError):
        verify_result(result, event, record, enclave=ENCLAVE, domain=DEFAULT_DOMAIN)  # type: ignore[arg-type]


def test_a_payload_that_does_not_decode_is_refused() -> None:
    event, record, result = _signed_pair(DeviceIdentity.generate())
    with pytest.raises(SignatureError, match="malformed"):
        verify_result(
            dataclasses.replace(result, payload=b"output"),
            event,  # type: ignore[arg-type]
            record,  # type: ignore[arg-type]
            enclave=ENCLAVE,
            domain=DEFAULT_DOMAIN,
        )


@pytest.mark.parametrize(
    "change",
    [
        {"payload": OUTPUT[:-1] + bytes([OUTPUT[-1] ^ 1])},
        {"salt": b"\x14" * 32},
        {"edge_seq": 10},
        {"latency_ms": 4},
        {"status": 1},
        {"signature": b"\x00" * 65},
    ],
)
def test_tampered_result_is_refused(change: dict[str, object]) -> None:
    event, record, result = _signed_pair(DeviceIdentity.generate())
    with pytest.raises(SignatureError):
        verify_result(
            dataclasses.replace(result, **change),  # type: ignore[arg-type]
            event,  # type: ignore[arg-type]
            record,  # type: ignore[arg-type]
            enclave=ENCLAVE,
            domain=DEFAULT_DOMAIN,
        )


def test_result_for_another_enclave_measurement_is_refused() -> None:
    event, record, result = _signed_pair(DeviceIdentity.generate())
    other = dataclasses.replace(ENCLAVE, measurement=b"\x09" * 32)
    with pytest.raises(SignatureError):
        verify_result(result, event, record, enclave=other, domain=DEFAULT_DOMAIN)  # type: ignore[arg-type]


def test_identity_from_hex_and_refusals() -> None:
    identity = DeviceIdentity.from_hex("0x" + "01" * 32)
    assert identity.address == address_of(b"\x01" * 32)
    assert identity.address_text.lower() == "0x" + identity.address.hex()
    assert "key" not in repr(identity)
    for bad in ("zz", "01" * 31, "00" * 32, "ff" * 32):
        with pytest.raises(ConfigError):
            DeviceIdentity.from_hex(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:7443", ("127.0.0.1", 7443)), ("[::1]:80", ("::1", 80)), ("edge:1", ("edge", 1))],
)
def test_edge_address_parses(text: str, expected: tuple[str, int]) -> None:
    assert parse_edge_address(text) == expected


@given(st.text(max_size=30))
def test_edge_address_parser_only_raises_config_error(text: str) -> None:
    try:
        host, port = parse_edge_address(text)
    except ConfigError:
        return
    assert host
    assert 0 < port < 65536


def test_channel_binding_is_the_one_the_edge_checks() -> None:
    from secure_ci.edge._session import channel_binding as edge_binding

    args = {
        "quote_id": b"\x01" * 32,
        "server_nonce": b"\x02" * 32,
        "session_id": b"\x03" * 16,
        "device": "0x" + "ab" * 20,
    }
    assert channel_binding(**args) == edge_binding(**args)  # type: ignore[arg-type]
    assert channel_binding(**{**args, "device": "0x" + "cd" * 20}) != channel_binding(**args)  # type: ignore[arg-type]
