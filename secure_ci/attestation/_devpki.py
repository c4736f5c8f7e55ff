"""A development PKI that mints SGX DCAP v3 quotes and collateral dcap-qvl accepts.

Profile and pitfalls (P1-P22) follow ``shared/notes/dcap-qvl-dev-pki.md``: a "NOT INTEL" root,
a PCK platform CA with cRLSign, a PCK leaf with the SGX extension and no EKU, an end-entity
TCB signer, CRLs with CRLNumber and AKI, TCB info v3 and QE identity v2 signed byte for byte
as embedded, dev FMSPC ``00DE7E000000``, 32-byte QE auth data, a fresh attestation key per
quote. Everything is relative to ``now`` (a parameter), and each negative case (TCB status,
advisories, revocation, expiry, debug) is one argument away. Dev quotes verify only when a
policy explicitly trusts :attr:`DevPKI.root_der`; they are refused under Intel's root.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import struct
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from secure_ci.attestation._collateral import Collateral
from secure_ci.attestation._policy import intel_root_der
from secure_ci.attestation._sgx_ext import SGX_EXTENSION_OID, sgx_extension_der
from secure_ci.exceptions import ConfigError

__all__ = ["DEV_FMSPC", "DEV_QE_MRSIGNER", "DevPKI"]

DEV_FMSPC = bytes.fromhex("00DE7E000000")
DEV_QE_MRSIGNER = hashlib.sha256(b"secure-ci dev quoting enclave signer (NOT INTEL)").digest()
DEV_QE_MRENCLAVE = hashlib.sha256(b"secure-ci dev quoting enclave (NOT INTEL)").digest()
INTEL_QE_VENDOR_ID = bytes.fromhex("939A7233F79C4CA9940A0DB3957F0607")
TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        "Revoked",
    }
)
_PLATFORM_CPUSVN = bytes([3, 3, 2, 2, 4, 1, 0, 3] + [0] * 8)
_PCESVN = 13
_QE_ISVSVN = 8
_QE_ISVPRODID = 1
_QE_ATTRIBUTES = bytes([0x11]) + bytes(15)
_ATTR_NORMAL = bytes([0x05]) + bytes(7) + bytes([0xE7]) + bytes(7)  # INIT | MODE64BIT
_ATTR_DEBUG = bytes([0x07]) + bytes(7) + bytes([0xE7]) + bytes(7)  # + DEBUG
_QE_AUTH_DATA = bytes(range(32))  # P1: exactly 32 bytes
_DN_ORG = "Dev Attestation PKI (NOT INTEL)"
_DAY = 86400
_SIG = hashes.SHA256()
_KEY_USAGES = (
    "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
    "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
)  # fmt: skip


@dataclass(frozen=True)
class DevPKI:
    """Dev root, PCK chain, TCB signer, CRLs and signed collateral; mints quotes."""

    now: int
    root_der: bytes
    collateral_json: str
    chain_pem: bytes = field(repr=False)
    leaf_key: ec.EllipticCurvePrivateKey = field(repr=False)
    leaf_der: bytes = field(repr=False)
    deterministic: bool = field(default=False, repr=False)

    @classmethod
    def generate(
        cls,
        now: int,
        *,
        tcb_status: str = "UpToDate",
        advisory_ids: tuple[str, ...] = (),
        revoke_leaf: bool = False,
        revoke_pck_ca: bool = False,
        validity_days: int = 30,
        seed: int | None = None,
        intel_dn: bool = False,
    ) -> DevPKI:
        """A fresh PKI whose collateral is valid from ``now - 1h`` for ``validity_days``.

        ``intel_dn`` gives the dev root Intel's exact subject DN: an impostor, for tests that
        roots are pinned by key and never by name.
        """
        if tcb_status not in TCB_STATUSES:
            raise ConfigError(f"unknown TCB status {tcb_status!r}")
        if not 1 <= validity_days <= 3650:
            raise ConfigError("validity_days must be between 1 and 3650")
        t0, det = _utc(now), seed is not None
        issued, next_update = t0 - dt.timedelta(hours=1), t0 + dt.timedelta(days=validity_days)
        cert_end = t0 + dt.timedelta(days=max(365, validity_days + 1))
        keys = [_key(seed, label) for label in ("root", "pck-ca", "pck-leaf", "tcb-signer")]
        root_key, ca_key, leaf_key, tcb_key = keys
        serials = [_serial(seed, label) for label in ("root", "pck-ca", "pck-leaf", "tcb")]
        root_name = _intel_root_dn() if intel_dn else _name("Dev SGX Root CA")
        ca_name = _name("Dev SGX PCK Platform CA")
        window = (t0, cert_end, det)
        root = _cert(root_name, root_key, root_name, root_key, serials[0], *window, ca=1)
        ca = _cert(ca_name, ca_key, root_name, root_key, serials[1], *window, ca=0)
        leaf_ext = sgx_extension_der(
            ppid=hashlib.sha256(b"ppid" + root.fingerprint(_SIG)).digest()[:16],
            cpusvn=_PLATFORM_CPUSVN,
            pcesvn=_PCESVN,
            pce_id=bytes(2),
            fmspc=DEV_FMSPC,
        )
        leaf = _cert(
            _name("Dev SGX PCK Certificate"), leaf_key, ca_name, ca_key, serials[2], *window,
            ca=None, sgx_ext=leaf_ext,
        )  # fmt: skip
        tcb_name = _name("Dev SGX TCB Signing")
        tcb = _cert(tcb_name, tcb_key, root_name, root_key, serials[3], *window, ca=None)
        crl_window = (issued, next_update, det)
        root_crl = _crl(root_name, root_key, *crl_window, [serials[1]] * revoke_pck_ca)
        pck_crl = _crl(ca_name, ca_key, *crl_window, [serials[2]] * revoke_leaf)
        stamps = {"issueDate": _stamp(issued), "nextUpdate": _stamp(next_update)}
        tcb_info = _compact(_tcb_info(stamps, tcb_status, advisory_ids))
        qe_identity = _compact(_qe_identity(stamps))
        pem = [c.public_bytes(serialization.Encoding.PEM).decode() for c in (root, ca, leaf, tcb)]
        collateral = {
            "pck_crl_issuer_chain": pem[1] + pem[0],
            "root_ca_crl": root_crl.hex(),
            "pck_crl": pck_crl.hex(),
            "tcb_info_issuer_chain": pem[3] + pem[0],
            "tcb_info": tcb_info,
            "tcb_info_signature": _raw_sign(tcb_key, tcb_info.encode(), det).hex(),
            "qe_identity_issuer_chain": pem[3] + pem[0],
            "qe_identity": qe_identity,
            "qe_identity_signature": _raw_sign(tcb_key, qe_identity.encode(), det).hex(),
        }
        return cls(
            now=now,
            root_der=root.public_bytes(serialization.Encoding.DER),
            collateral_json=json.dumps(collateral, indent=2),
            chain_pem=(pem[2] + pem[1] + pem[0]).encode() + b"\0",  # P4: leaf first
            leaf_key=leaf_key,
            leaf_der=leaf.public_bytes(serialization.Encoding.DER),
            deterministic=det,
        )

    @property
    def root_pem(self) -> str:
        cert = x509.load_der_x509_certificate(self.root_der)
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def collateral(self) -> Collateral:
        """The collateral as the verifier's :class:`Collateral` value."""
        return Collateral.from_json(self.collateral_json)

    def quote(
        self,
        *,
        report_data: bytes = bytes(64),
        mrenclave: bytes,
        mrsigner: bytes,
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        debug: bool = False,
        attributes: bytes | None = None,
    ) -> bytes:
        """A DCAP v3 quote (ECDSA-P256, cert data type 5) for the given enclave identity."""
        if len(report_data) != 64 or len(mrenclave) != 32 or len(mrsigner) != 32:
            raise ConfigError("report_data is 64 bytes; mrenclave and mrsigner are 32 bytes")
        if attributes is not None and len(attributes) != 16:
            raise ConfigError("attributes are 16 bytes (flags, xfrm)")
        if not (0 <= isv_prod_id <= 0xFFFF and 0 <= isv_svn <= 0xFFFF):
            raise ConfigError("isv_prod_id and isv_svn are 16-bit")
        attrs = attributes if attributes is not None else (_ATTR_DEBUG if debug else _ATTR_NORMAL)
        header = struct.pack("<HHIHH", 3, 2, 0, _QE_ISVSVN, _PCESVN) + INTEL_QE_VENDOR_ID
        header += bytes(20)
        body = _report(_PLATFORM_CPUSVN, attrs, mrenclave, mrsigner, isv_prod_id, isv_svn)
        body += report_data
        seed = hashlib.sha256(b"attestation-key" + self.leaf_der + header + body).digest()
        att_key = _derive(int.from_bytes(seed)) if self.deterministic else _fresh()
        att_pub = att_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        qe_report = _report(
            _PLATFORM_CPUSVN, _QE_ATTRIBUTES, DEV_QE_MRENCLAVE, DEV_QE_MRSIGNER,
            _QE_ISVPRODID, _QE_ISVSVN,
        ) + hashlib.sha256(att_pub + _QE_AUTH_DATA).digest() + bytes(32)  # fmt: skip
        signature_data = b"".join(
            [
                _raw_sign(att_key, header + body, self.deterministic),
                att_pub,
                qe_report,
                _raw_sign(self.leaf_key, qe_report, self.deterministic),
                struct.pack("<H", len(_QE_AUTH_DATA)),
                _QE_AUTH_DATA,
                struct.pack("<HI", 5, len(self.chain_pem)),
                self.chain_pem,
            ]
        )
        return header + body + struct.pack("<I", len(signature_data)) + signature_data


def _report(
    cpusvn: bytes, attrs: bytes, mrenclave: bytes, mrsigner: bytes, prod: int, svn: int
) -> bytes:
    """The first 320 bytes of an SGX report body (everything before report_data)."""
    ids = struct.pack("<HH", prod, svn)
    return b"".join(
        [cpusvn, bytes(32), attrs, mrenclave, bytes(32), mrsigner, bytes(96), ids, bytes(60)]
    )


def _tcb_info(
    stamps: dict[str, str], status: str, advisories: tuple[str, ...]
) -> dict[str, object]:
    level: dict[str, object] = {
        "tcb": {"sgxtcbcomponents": [{"svn": s} for s in _PLATFORM_CPUSVN], "pcesvn": _PCESVN},
        "tcbDate": stamps["issueDate"],
        "tcbStatus": status,
    }
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return {
        "id": "SGX",
        "version": 3,
        **stamps,
        "fmspc": DEV_FMSPC.hex().upper(),
        "pceId": "0000",
        "tcbType": 0,
        "tcbEvaluationDataNumber": 17,
        "tcbLevels": [level],
    }


def _qe_identity(stamps: dict[str, str]) -> dict[str, object]:
    return {
        "id": "QE",
        "version": 2,
        **stamps,
        "tcbEvaluationDataNumber": 17,
        "miscselect": "00000000",
        "miscselectMask": "FFFFFFFF",
        "attributes": _QE_ATTRIBUTES.hex().upper(),
        "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
        "mrsigner": DEV_QE_MRSIGNER.hex().upper(),
        "isvprodid": _QE_ISVPRODID,
        "tcbLevels": [
            {"tcb": {"isvsvn": _QE_ISVSVN}, "tcbDate": stamps["issueDate"], "tcbStatus": "UpToDate"}
        ],
    }


def _compact(value: dict[str, object]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _utc(now: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, dt.UTC).replace(microsecond=0)


def _stamp(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _DN_ORG),
        ]
    )


def _intel_root_dn() -> x509.Name:
    return x509.load_der_x509_certificate(intel_root_der()).subject


def _fresh() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _derive(secret: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(secret % (_P256_ORDER - 1) + 1, ec.SECP256R1())


def _key(seed: int | None, label: str) -> ec.EllipticCurvePrivateKey:
    if seed is None:
        return _fresh()
    return _derive(
        int.from_bytes(hashlib.sha256(f"secure-ci/devpki/{seed}/{label}".encode()).digest())
    )


def _serial(seed: int | None, label: str) -> int:
    if seed is None:
        return x509.random_serial_number()
    digest = hashlib.sha256(f"secure-ci/devpki/{seed}/serial/{label}".encode()).digest()
    return int.from_bytes(digest[:16]) >> 1 | 1


def _raw_sign(key: ec.EllipticCurvePrivateKey, data: bytes, deterministic: bool) -> bytes:
    """ECDSA-SHA256 as raw ``r || s`` (the quote and collateral format)."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(_SIG, deterministic_signing=deterministic)))
    return r.to_bytes(32) + s.to_bytes(32)


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    serial: int,
    t0: dt.datetime,
    end: dt.datetime,
    deterministic: bool,
    *,
    ca: int | None,
    sgx_ext: bytes | None = None,
) -> x509.Certificate:
    """A certificate: ``ca`` is the path length of a CA, None for an end entity (P2, P3, P6)."""
    usage = dict.fromkeys(_KEY_USAGES, False)
    if ca is None:
        usage.update(digital_signature=True, content_commitment=True)
    else:
        usage.update(key_cert_sign=True, crl_sign=True)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(t0 - dt.timedelta(days=1))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca is not None, path_length=ca), critical=True)
        .add_extension(x509.KeyUsage(**usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if sgx_ext is not None:
        oid = x509.ObjectIdentifier(SGX_EXTENSION_OID)
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, sgx_ext), critical=False)
    return builder.sign(issuer_key, _SIG, ecdsa_deterministic=deterministic)


def _crl(
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    this_update: dt.datetime,
    next_update: dt.datetime,
    deterministic: bool,
    revoked: list[int],
) -> bytes:
    """A v2 CRL with CRLNumber and AKI (P7), DER."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    )
    for serial in revoked:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(this_update)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(key, _SIG, ecdsa_deterministic=deterministic)
    return crl.public_bytes(serialization.Encoding.DER)
