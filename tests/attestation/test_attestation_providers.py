"""Evidence providers: Gramine's /dev/attestation (against a fake tree) and the simulated one."""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_ci.attestation import (
    DevPKI,
    EvidenceProvider,
    GramineProvider,
    SimulatedProvider,
    make_ratls_certificate,
    open_provider,
    ratls_report_data,
    spki_der_of,
    verify_quote,
    verify_ratls_certificate,
)
from secure_ci.exceptions import AttestationError, ConfigError, EvidenceFormatError
from secure_ci.testing import DEV_MRENCLAVE, DEV_NOW, dev_pki, dev_policy, dev_provider


@pytest.fixture(scope="module")
def pki() -> DevPKI:
    return dev_pki()


def _gramine_tree(root: Path, *, kind: bytes = b"dcap", quote: bytes = b"") -> Path:
    """The three pseudo-files Gramine exposes, as plain files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "attestation_type").write_bytes(kind)
    (root / "user_report_data").write_bytes(bytes(64))
    (root / "quote").write_bytes(quote)
    return root


def test_simulated_provider(pki: DevPKI) -> None:
    provider = dev_provider(pki)
    assert isinstance(provider, EvidenceProvider)
    assert provider.attestation_type == "simulated"
    data = bytes(range(64))
    collateral = provider.collateral()
    assert collateral.digest == pki.collateral.digest
    enclave = verify_quote(
        provider.quote(data), collateral=collateral, policy=dev_policy(pki), now=DEV_NOW
    )
    assert enclave.report_data == data
    assert enclave.mrenclave == DEV_MRENCLAVE


@pytest.mark.parametrize("bad", [b"", bytes(63), bytes(65)])
def test_report_data_must_be_64_bytes(pki: DevPKI, tmp_path: Path, bad: bytes) -> None:
    with pytest.raises(ConfigError):
        dev_provider(pki).quote(bad)
    with pytest.raises(ConfigError):
        GramineProvider(_gramine_tree(tmp_path)).quote(bad)


def test_gramine_writes_report_data_and_reads_quote(pki: DevPKI, tmp_path: Path) -> None:
    data = bytes(range(64))
    quote = dev_provider(pki).quote(data)
    provider = GramineProvider(_gramine_tree(tmp_path, kind=b"dcap\n", quote=quote))
    assert isinstance(provider, EvidenceProvider)
    assert provider.attestation_type == "dcap"
    assert provider.quote(data) == quote
    assert (tmp_path / "user_report_data").read_bytes() == data
    assert provider.collateral() is None


def test_gramine_quote_in_ratls_certificate(pki: DevPKI, tmp_path: Path) -> None:
    """A quote read from Gramine binds the TLS key exactly as a Gramine enclave would."""
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    quote = dev_provider(pki).quote(ratls_report_data(spki_der_of(key)))
    provider = GramineProvider(_gramine_tree(tmp_path, quote=quote))
    creds = make_ratls_certificate(provider, now=DEV_NOW, key=key)
    assert (tmp_path / "user_report_data").read_bytes() == ratls_report_data(spki_der_of(key))
    enclave = verify_ratls_certificate(
        creds.cert_der, collateral=pki.collateral, policy=dev_policy(pki), now=DEV_NOW
    )
    assert enclave.mrenclave == DEV_MRENCLAVE


def test_gramine_attestation_none_is_explained(tmp_path: Path) -> None:
    provider = GramineProvider(_gramine_tree(tmp_path, kind=b"none"))
    with pytest.raises(AttestationError, match="remote attestation is disabled"):
        provider.quote(bytes(64))


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        (b"epid", AttestationError),
        (b"\xff\xfe", EvidenceFormatError),
        (b"d" * 65, EvidenceFormatError),
    ],
)
def test_gramine_bad_attestation_type(
    tmp_path: Path, kind: bytes, error: type[AttestationError]
) -> None:
    with pytest.raises(error):
        _ = GramineProvider(_gramine_tree(tmp_path, kind=kind)).attestation_type


def test_gramine_missing_tree(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="cannot read"):
        GramineProvider(tmp_path / "absent").quote(bytes(64))


def test_gramine_unwritable_report_data(tmp_path: Path) -> None:
    root = _gramine_tree(tmp_path, quote=b"q" * 200)
    (root / "user_report_data").unlink()
    (root / "user_report_data").mkdir()
    with pytest.raises(AttestationError, match="cannot write"):
        GramineProvider(root).quote(bytes(64))


@pytest.mark.parametrize("size", [0, 64 * 1024 + 1])
def test_gramine_quote_size_limits(tmp_path: Path, size: int) -> None:
    provider = GramineProvider(_gramine_tree(tmp_path, quote=b"\x03" * size))
    with pytest.raises(EvidenceFormatError):
        provider.quote(bytes(64))


def test_open_provider(pki: DevPKI, tmp_path: Path) -> None:
    simulated = dev_provider(pki)
    tree = _gramine_tree(tmp_path / "attestation")
    assert open_provider("auto", gramine_root=tree, simulated=simulated) == GramineProvider(tree)
    absent = tmp_path / "absent"
    assert open_provider("auto", gramine_root=absent, simulated=simulated) is simulated
    assert open_provider("gramine", gramine_root=absent) == GramineProvider(absent)
    assert open_provider("simulated", simulated=simulated) is simulated
    assert isinstance(simulated, SimulatedProvider)


def test_open_provider_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        open_provider("simulated")
    with pytest.raises(ConfigError):
        open_provider("auto", gramine_root=tmp_path / "absent")
    with pytest.raises(ConfigError):
        open_provider("sgx")  # type: ignore[arg-type]
