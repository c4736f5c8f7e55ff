"""The named negative corpus: every case is rejected with exactly the expected class.

Cases are one-line variations of a good dev-PKI quote (or of a real Intel quote) modelled on
dcap-qvl's own negative tests. A quick mutation-fuzzing run checks that no mutated quote is
ever accepted; the full 10,000-mutation run is in the benchmark.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import struct
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from secure_ci.attestation import Collateral, DevPKI, MrSignerRule, Policy, verify_quote
from secure_ci.attestation._quote import MAX_QUOTE_PADDING
from secure_ci.exceptions import (
    AttestationError,
    AttributesError,
    CollateralError,
    DebugEnclaveError,
    EvidenceFormatError,
    EvidenceSignatureError,
    MeasurementError,
    ReportDataError,
    RevokedError,
    TcbStatusError,
    UnsupportedEvidenceError,
)

NOW = 1750500000
DAY = 86_400
MRENCLAVE = bytes(range(32))
MRSIGNER = bytes(range(32, 64))
KEY = b"expected SubjectPublicKeyInfo"
NONCE = b"nonce"
BOUND = hashlib.sha256(KEY).digest() + hashlib.sha256(NONCE).digest()
VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "attestation"
# offsets inside a v3 quote: header 0..48, body 48..432, sig len 432, ISV signature 436..500,
# attestation key 500..564, QE report 564..948, QE signature 948..1012, auth size 1012
ISV_SIG, ATT_KEY, QE_REPORT, QE_SIG = 436, 500, 564, 948


@dataclasses.dataclass(frozen=True)
class Case:
    quote: bytes
    collateral: Collateral
    policy: Policy
    now: int = NOW
    key: bytes | None = KEY
    nonce: bytes | None = NONCE


@cache
def _pki(**kwargs: Any) -> DevPKI:
    return DevPKI.generate(NOW, seed=11, **kwargs)


def _good_quote(pki: DevPKI | None = None, **kwargs: Any) -> bytes:
    args: dict[str, Any] = {"report_data": BOUND, "mrenclave": MRENCLAVE, "mrsigner": MRSIGNER}
    args.update(kwargs)
    return (pki or _pki()).quote(**args)


def _policy(pki: DevPKI | None = None, **changes: Any) -> Policy:
    kwargs: dict[str, Any] = {"roots": ((pki or _pki()).root_der,), "mrenclave": {MRENCLAVE}}
    kwargs.update(changes)
    kwargs["mrenclave"] = frozenset(kwargs["mrenclave"])
    return Policy(**kwargs)


def _case(quote: bytes | None = None, pki: DevPKI | None = None, **changes: Any) -> Case:
    pki = pki or _pki()
    policy_changes = {k: changes.pop(k) for k in list(changes) if k in Policy.__dataclass_fields__}
    return Case(
        quote=quote if quote is not None else _good_quote(pki),
        collateral=pki.collateral,
        policy=_policy(pki, **policy_changes),
        **changes,
    )


def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def _flip(data: bytes, offset: int) -> bytes:
    return _patch(data, offset, bytes([data[offset] ^ 0x01]))


def _swap(data: bytes, a: int, b: int, size: int) -> bytes:
    out = bytearray(data)
    out[a : a + size], out[b : b + size] = data[b : b + size], data[a : a + size]
    return bytes(out)


def _real(name: str) -> Case:
    coll = Collateral.from_json((VECTORS / "sgx-v3-dcapqvl-sample.collateral.json").read_text())
    quote = (VECTORS / name).read_bytes()
    body_mrenclave = quote[112:144]
    policy = Policy(
        mrenclave=frozenset({body_mrenclave}),
        tcb_status=frozenset({"ConfigurationAndSWHardeningNeeded"}),
        advisories=frozenset({"*"}),
    )
    return Case(quote, coll, policy, key=None, nonce=None)


CORPUS: dict[str, tuple[Callable[[], Case], type[AttestationError]]] = {
    # structure (our parser)
    "empty": (lambda: _case(b""), EvidenceFormatError),
    "truncated-header": (lambda: _case(_good_quote()[:40]), EvidenceFormatError),
    "truncated-body": (lambda: _case(_good_quote()[:300]), EvidenceFormatError),
    "truncated-signature-data": (lambda: _case(_good_quote()[:-100]), EvidenceFormatError),
    "trailing-nonzero-byte": (lambda: _case(_good_quote() + b"\1"), EvidenceFormatError),
    "trailing-nonzero-after-padding": (
        lambda: _case(_good_quote() + bytes(64) + b"\x80"),
        EvidenceFormatError,
    ),
    "trailing-padding-over-bound": (
        lambda: _case(_good_quote() + bytes(MAX_QUOTE_PADDING + 1)),
        EvidenceFormatError,
    ),
    "sig-len-too-large": (
        lambda: _case(_patch(_good_quote(), 432, struct.pack("<I", 1 << 16))),
        EvidenceFormatError,
    ),
    "sig-len-too-small": (
        lambda: _case(_patch(_good_quote(), 432, struct.pack("<I", 2000))),
        EvidenceFormatError,
    ),
    "qe-auth-size-edited": (
        lambda: _case(_patch(_good_quote(), 1012, struct.pack("<H", 31))),
        EvidenceFormatError,
    ),
    "pem-chain-whitespace": (
        lambda: _case(_good_quote().replace(b"CATE-----\n", b"CATE-----\x0b", 1)),
        EvidenceFormatError,
    ),
    "wrong-version": (
        lambda: _case(_patch(_good_quote(), 0, struct.pack("<H", 2))),
        UnsupportedEvidenceError,
    ),
    "wrong-att-key-type": (
        lambda: _case(_patch(_good_quote(), 2, struct.pack("<H", 3))),
        UnsupportedEvidenceError,
    ),
    "wrong-tee-type": (
        lambda: _case(_patch(_good_quote(), 4, struct.pack("<I", 0x81))),
        UnsupportedEvidenceError,
    ),
    "wrong-qe-vendor": (lambda: _case(_flip(_good_quote(), 12)), UnsupportedEvidenceError),
    # signatures and chain (dcap-qvl)
    "flipped-report-data": (lambda: _case(_flip(_good_quote(), 48 + 320)), EvidenceSignatureError),
    "flipped-mrenclave": (lambda: _case(_flip(_good_quote(), 48 + 64)), EvidenceSignatureError),
    "flipped-isv-signature": (lambda: _case(_flip(_good_quote(), ISV_SIG)), EvidenceSignatureError),
    "flipped-attestation-key": (
        lambda: _case(_flip(_good_quote(), ATT_KEY + 5)),
        EvidenceSignatureError,
    ),
    "flipped-qe-report": (
        lambda: _case(_flip(_good_quote(), QE_REPORT + 64)),
        EvidenceSignatureError,
    ),
    "flipped-qe-signature": (lambda: _case(_flip(_good_quote(), QE_SIG)), EvidenceSignatureError),
    "swapped-isv-and-qe-signatures": (
        lambda: _case(_swap(_good_quote(), ISV_SIG, QE_SIG, 64)),
        EvidenceSignatureError,
    ),
    "dev-quote-under-intel-root": (
        lambda: _case(roots=Policy().roots),
        EvidenceSignatureError,
    ),
    "collateral-of-another-pki": (
        lambda: dataclasses.replace(_case(), collateral=DevPKI.generate(NOW, seed=12).collateral),
        EvidenceSignatureError,
    ),
    "quote-from-another-pki": (
        lambda: _case(_good_quote(DevPKI.generate(NOW, seed=13))),
        EvidenceSignatureError,
    ),
    "real-intel-quote-flipped-body": (
        lambda: dataclasses.replace(
            _real("sgx-v3-dcapqvl-sample.bin"),
            quote=_flip(_real("sgx-v3-dcapqvl-sample.bin").quote, 48 + 300),
        ),
        EvidenceSignatureError,
    ),
    "revoked-leaf": (lambda: _case(pki=_pki(revoke_leaf=True)), RevokedError),
    "revoked-pck-ca": (lambda: _case(pki=_pki(revoke_pck_ca=True)), RevokedError),
    # collateral freshness
    "collateral-expired": (lambda: _case(now=NOW + 40 * DAY), CollateralError),
    "collateral-not-yet-valid": (lambda: _case(now=NOW - 2 * DAY), CollateralError),
    "collateral-too-old": (
        lambda: _case(now=NOW + 5 * DAY, max_collateral_age_days=2),
        CollateralError,
    ),
    "sgx-quote-with-tdx-collateral": (
        lambda: dataclasses.replace(
            _real("sgx-v3-dcapqvl-sample.bin"),
            collateral=Collateral.from_json(
                (VECTORS / "tdx-v4-dcapqvl-sample.collateral.json").read_text()
            ),
        ),
        CollateralError,
    ),
    # TCB
    "tcb-out-of-date": (lambda: _case(pki=_pki(tcb_status="OutOfDate")), TcbStatusError),
    "tcb-sw-hardening-not-accepted": (
        lambda: _case(pki=_pki(tcb_status="SWHardeningNeeded")),
        TcbStatusError,
    ),
    "advisory-not-allowed": (
        lambda: _case(
            pki=_pki(tcb_status="SWHardeningNeeded", advisory_ids=("INTEL-SA-00615",)),
            tcb_status=frozenset({"SWHardeningNeeded"}),
            advisories=frozenset({"INTEL-SA-00289"}),
        ),
        TcbStatusError,
    ),
    # enclave policy
    "debug-enclave": (lambda: _case(_good_quote(debug=True)), DebugEnclaveError),
    "debug-real-intel-quote": (lambda: _real("sgx-v3-automata-solana.bin"), DebugEnclaveError),
    "attributes-no-mode64": (
        lambda: _case(_good_quote(attributes=b"\x01" + bytes(15))),
        AttributesError,
    ),
    "attributes-provision-key": (
        lambda: _case(_good_quote(attributes=b"\x15" + bytes(15))),
        AttributesError,
    ),
    "wrong-mrenclave": (lambda: _case(mrenclave={bytes(32)}), MeasurementError),
    "mrsigner-svn-too-low": (
        lambda: _case(mrenclave=set(), mrsigner=(MrSignerRule(MRSIGNER, 0, 1),)),
        MeasurementError,
    ),
    "mrsigner-wrong-product": (
        lambda: _case(mrenclave=set(), mrsigner=(MrSignerRule(MRSIGNER, 9, 0),)),
        MeasurementError,
    ),
    # report data binding
    "wrong-key-binding": (lambda: _case(key=b"another key"), ReportDataError),
    "wrong-nonce": (lambda: _case(nonce=b"stale nonce"), ReportDataError),
    "missing-required-nonce": (lambda: _case(nonce=None, require_nonce=True), ReportDataError),
    "unbound-report-data": (lambda: _case(_good_quote(report_data=bytes(64))), ReportDataError),
}


def _verify(case: Case) -> object:
    return verify_quote(
        case.quote,
        collateral=case.collateral,
        policy=case.policy,
        now=case.now,
        expected_key_spki=case.key,
        nonce=case.nonce,
    )


def test_baseline_is_accepted() -> None:
    assert len(CORPUS) >= 25
    enclave = _verify(_case())
    assert enclave.mrenclave == MRENCLAVE  # type: ignore[attr-defined]
    # zero padding up to the bound is not a negative case: same result as without it
    assert _verify(_case(_good_quote() + bytes(MAX_QUOTE_PADDING))) == enclave


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_negative_case(name: str) -> None:
    build, error = CORPUS[name]
    with pytest.raises(AttestationError) as info:
        _verify(build())
    assert info.type is error, f"{name}: {info.type.__name__}: {info.value}"


def _mutate(rng: random.Random, quote: bytes) -> bytes:
    data = bytearray(quote)
    kind = rng.randrange(5)
    pos = rng.randrange(len(data))
    if kind == 0:
        data[pos] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del data[pos:]
    elif kind == 2:
        data[pos : pos + 4] = rng.randbytes(4)
    elif kind == 3:
        data[pos:pos] = rng.randbytes(rng.randrange(1, 8))
    else:
        size = rng.choice([2, 4, 16, 64])
        other = rng.randrange(len(data))
        data[pos : pos + size], data[other : other + size] = (
            data[other : other + size],
            data[pos : pos + size],
        )
    return bytes(data)


def test_quick_mutation_fuzz_accepts_nothing() -> None:
    rng = random.Random(2025)
    case = _case()
    tried = 0
    for _ in range(400):
        mutated = _mutate(rng, case.quote)
        if mutated == case.quote:
            continue
        tried += 1
        with pytest.raises(AttestationError):
            _verify(dataclasses.replace(case, quote=mutated))
    assert tried > 350
