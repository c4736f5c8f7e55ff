"""Mutation fuzzing: no mutant of a dev or real Intel quote (or RA-TLS certificate) is a forgery.

Policy decision (documented in ``secure_ci.testing._quote_fuzz``): a mutant that verifies with
a result *identical* to the original's (same quote id, measurements, report data, PCK leaf,
TCB) only changed unsigned bytes (the root copy at the end of the PEM chain, PEM whitespace,
slack after the cert data); it is counted apart and is not a forgery. Appended bytes are
refused unless they are all zero (bounded padding, which leaves the result identical).
Everything else must raise an AttestationError.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from itertools import islice, pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_ci.attestation import Collateral, Policy, make_ratls_certificate, verify_quote
from secure_ci.attestation import verify_ratls_certificate as verify_cert
from secure_ci.exceptions import AttestationError
from secure_ci.testing import (
    DEV_NOW,
    dev_pki,
    dev_policy,
    dev_provider,
    fuzz_verifier,
    mutate_quote,
    quote_regions,
)

SAMPLE_MRENCLAVE = bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
V3_REGIONS = {
    "header", "isv_body", "sig_data_len", "isv_sig", "att_key", "qe_report", "qe_sig",
    "qe_auth_size", "qe_auth", "cert_type", "cert_size", "cert_data",
}  # fmt: skip


@pytest.fixture(scope="module")
def dev_case() -> tuple[bytes, Callable[[bytes], Any]]:
    pki = dev_pki()
    collateral, policy = pki.collateral, dev_policy(pki)
    quote = dev_provider(pki).quote(bytes(range(64)))
    return quote, lambda q: verify_quote(q, collateral=collateral, policy=policy, now=DEV_NOW)


def test_regions_cover_the_quote(dev_case: tuple[bytes, Any]) -> None:
    quote, _ = dev_case
    regions = quote_regions(quote)
    assert set(regions) == V3_REGIONS
    spans = sorted(regions.values())
    assert spans[0][0] == 0
    assert spans[-1][1] == len(quote)
    assert all(a[1] == b[0] for a, b in pairwise(spans))
    assert set(quote_regions(b"\x04\x00" + bytes(100))) == {"header", "rest"}


def test_mutations_reach_every_region_and_kind(dev_case: tuple[bytes, Any]) -> None:
    quote, _ = dev_case
    kinds = {k for k, _ in islice(mutate_quote(quote, random.Random(0)), 400)}
    assert {f"flip:{r}" for r in V3_REGIONS} <= kinds
    assert {"truncate", "append"} <= kinds
    assert any(k.startswith("length:") for k in kinds)
    assert any(k.startswith("swap:") for k in kinds)


def test_mutants_differ_and_are_reproducible(dev_case: tuple[bytes, Any]) -> None:
    quote, _ = dev_case
    one = list(islice(mutate_quote(quote, random.Random(7)), 50))
    two = list(islice(mutate_quote(quote, random.Random(7)), 50))
    assert one == two
    assert all(m != quote for _, m in one)


def test_dev_quote_mutants_are_never_forgeries(dev_case: tuple[bytes, Any]) -> None:
    quote, verify = dev_case
    report = fuzz_verifier(quote, verify, count=400, rng=random.Random(1))
    assert report.forged == []
    assert report.crashed == []
    assert report.tried == 400
    assert report.rejected >= 300
    benign = set(report.accepted_benign)
    assert benign <= {"flip:cert_data", "flip:cert_size", "length:cert_size"}


def test_real_intel_quote_mutants_are_never_forgeries(
    vector: Callable[[str], bytes], sgx_collateral: Collateral, in_window: int
) -> None:
    quote = vector("sgx-v3-dcapqvl-sample.bin")
    policy = Policy(
        mrenclave=frozenset({SAMPLE_MRENCLAVE}),
        tcb_status=frozenset({"ConfigurationAndSWHardeningNeeded"}),
        advisories=frozenset({"INTEL-SA-00289", "INTEL-SA-00615"}),
    )

    def verify(q: bytes) -> Any:
        return verify_quote(q, collateral=sgx_collateral, policy=policy, now=in_window)

    report = fuzz_verifier(quote, verify, count=300, rng=random.Random(2))
    assert report.forged == []
    assert report.crashed == []
    assert report.rejected >= 200


def test_ratls_certificate_mutants_are_never_forgeries() -> None:
    pki = dev_pki()
    creds = make_ratls_certificate(dev_provider(pki), now=DEV_NOW)
    collateral, policy = pki.collateral, dev_policy(pki)

    def verify(der: bytes) -> Any:
        return verify_cert(der, collateral=collateral, policy=policy, now=DEV_NOW)

    baseline, rng = verify(creds.cert_der), random.Random(3)
    for _ in range(150):
        mutant = bytearray(creds.cert_der)
        mutant[rng.randrange(len(mutant))] ^= 1 << rng.randrange(8)
        try:
            result = verify(bytes(mutant))
        except AttestationError:
            continue
        assert result == baseline


@settings(max_examples=60)
@given(data=st.binary(max_size=1500), v3=st.booleans())
def test_mutator_handles_any_input(data: bytes, v3: bool) -> None:
    quote = (b"\x03\x00" + data + bytes(1100)) if v3 else data + b"\x01"
    for start, end in quote_regions(quote).values():
        assert 0 <= start < end <= len(quote)
    for _, mutant in islice(mutate_quote(quote, random.Random(0)), 30):
        assert mutant != quote
