"""Our own strict parser for Intel DCAP quotes (SGX v3, TDX v4 and v5).

dcap-qvl parses too, but it tolerates slack (trailing bytes, oversized length fields) and its
errors are strings. This parser bounds-checks every field first, so malformed input is refused
with :class:`EvidenceFormatError` before any cryptography runs, and it exposes the fields our
policy and the ledger need (measurements, report data, the signed region, the PCK chain).

Bytes after the signature data are covered by no signature. Real TDX quote buffers carry zero
padding there (70 bytes in dcap-qvl's sample, 3,065 in Automata's 8,000-byte buffer), so up to
:data:`MAX_QUOTE_PADDING` zero bytes are accepted; a single non-zero byte, or more padding, is
refused: a strict verifier leaves no room for unsigned content.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from secure_ci.exceptions import EvidenceFormatError, UnsupportedEvidenceError

__all__ = [
    "MAX_QUOTE_BYTES",
    "MAX_QUOTE_PADDING",
    "Quote",
    "SgxReportBody",
    "TdReportBody",
    "parse_quote",
]

MAX_QUOTE_BYTES = 64 * 1024
"""Largest quote we look at; real ones are 4-8 KiB."""

MAX_QUOTE_PADDING = 8 * 1024
"""Most zero bytes accepted after the signature data: generous next to real buffers (Automata's
8,000-byte buffer pads 3,065 bytes), small next to :data:`MAX_QUOTE_BYTES`."""

HEADER_LEN = 48
SGX_BODY_LEN = 384
TD10_BODY_LEN = 584
TD15_BODY_LEN = 648
ECDSA_P256 = 2
TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
CERT_PCK_CHAIN = 5
CERT_QE_REPORT = 6
_V5_BODY = {1: ("sgx", SGX_BODY_LEN), 2: ("tdx", TD10_BODY_LEN), 3: ("tdx", TD15_BODY_LEN)}
_B64_LINES = rb"(?:[A-Za-z0-9+/=]{1,76}\n){1,64}"
_BEGIN, _END = rb"-----BEGIN CERTIFICATE-----\n", rb"-----END CERTIFICATE-----\n?"
_PEM_BLOCK = re.compile(_BEGIN + rb"(" + _B64_LINES + rb")" + _END)
_PEM_CHAIN = re.compile(rb"(?:" + _BEGIN + _B64_LINES + _END + rb"){1,4}")


@dataclass(frozen=True)
class SgxReportBody:
    """The ISV enclave report (384 bytes) of an SGX quote."""

    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes

    @property
    def debug(self) -> bool:
        return bool(self.attributes[0] & 0x02)


@dataclass(frozen=True)
class TdReportBody:
    """A TD report (1.0: 584 bytes, 1.5: 648 bytes) of a TDX quote."""

    tee_tcb_svn: bytes
    mrseam: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mrconfigid: bytes
    mrowner: bytes
    mrownerconfig: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes[0] & 0x01)


@dataclass(frozen=True)
class Quote:
    """A parsed, *unverified* quote. Only :func:`verify_quote` turns it into something trusted."""

    version: int
    att_key_type: int
    tee_type: int
    qe_vendor_id: bytes
    body: SgxReportBody | TdReportBody
    signed_region: bytes
    sig_data_len: int
    cert_data_type: int
    pck_chain: bytes
    trailing: int
    """Zero padding bytes after the signature data (unsigned, never part of the quote id)."""

    @property
    def tee(self) -> str:
        return "sgx" if isinstance(self.body, SgxReportBody) else "tdx"

    @property
    def quote_id(self) -> str:
        """Hex SHA-256 of header || report body: the part the attestation key signs."""
        return hashlib.sha256(self.signed_region).hexdigest()

    @property
    def report_data(self) -> bytes:
        return self.body.report_data

    def pck_chain_der(self) -> tuple[bytes, ...]:
        """DER certificates of the embedded PEM PCK chain, leaf first.

        The grammar is strict (canonical base64 in lines ended by ``\\n``, one optional
        trailing NUL) so that the chain, which no signature covers, has one byte form only.
        """
        chain = self.pck_chain.removesuffix(b"\0")
        if not _PEM_CHAIN.fullmatch(chain):
            raise EvidenceFormatError("quote's PCK certificate chain is not a strict PEM chain")
        out = []
        for block in _PEM_BLOCK.findall(chain):
            text = block.replace(b"\n", b"")
            try:
                der = base64.b64decode(text, validate=True)
            except binascii.Error as exc:
                raise EvidenceFormatError("quote's PCK chain holds invalid base64") from exc
            if base64.b64encode(der) != text:
                raise EvidenceFormatError("quote's PCK chain holds non-canonical base64")
            out.append(der)
        return tuple(out)

    def pck_leaf_der(self) -> bytes:
        """DER of the first (leaf) certificate of the embedded PEM PCK chain."""
        return self.pck_chain_der()[0]


class _Reader:
    """Bounds-checked little-endian reads over a fixed buffer."""

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data, self.pos, self.end = data, start, end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise EvidenceFormatError(
                f"quote truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"only {self.end - self.pos} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")


def _sgx_body(b: bytes) -> SgxReportBody:
    return SgxReportBody(
        cpu_svn=b[0:16],
        misc_select=int.from_bytes(b[16:20], "little"),
        attributes=b[48:64],
        mrenclave=b[64:96],
        mrsigner=b[128:160],
        isv_prod_id=int.from_bytes(b[256:258], "little"),
        isv_svn=int.from_bytes(b[258:260], "little"),
        report_data=b[320:384],
    )


def _td_body(b: bytes) -> TdReportBody:
    def mr(offset: int) -> bytes:
        return b[offset : offset + 48]

    return TdReportBody(
        tee_tcb_svn=b[0:16],
        mrseam=mr(16),
        td_attributes=b[120:128],
        xfam=b[128:136],
        mrtd=mr(136),
        mrconfigid=mr(184),
        mrowner=mr(232),
        mrownerconfig=mr(280),
        rtmrs=(mr(328), mr(376), mr(424), mr(472)),
        report_data=b[520:584],
    )


def _header(r: _Reader) -> tuple[int, int, int, bytes]:
    version = r.u16("header.version")
    att_key_type = r.u16("header.att_key_type")
    tee_type = r.u32("header.tee_type")
    r.take(4, "header.svns")
    vendor = r.take(16, "header.qe_vendor_id")
    r.take(20, "header.user_data")
    if version not in (3, 4, 5):
        raise UnsupportedEvidenceError(f"quote version {version} is not supported (3, 4, 5 are)")
    if att_key_type != ECDSA_P256:
        raise UnsupportedEvidenceError(
            f"attestation key type {att_key_type} is not supported (only 2, ECDSA-256 P-256)"
        )
    if tee_type not in (TEE_SGX, TEE_TDX):
        raise UnsupportedEvidenceError(f"TEE type {tee_type:#x} is not supported")
    if vendor != INTEL_QE_VENDOR_ID:
        raise UnsupportedEvidenceError(f"QE vendor {vendor.hex()} is not Intel's")
    return version, att_key_type, tee_type, vendor


def _body(r: _Reader, version: int, tee_type: int) -> SgxReportBody | TdReportBody:
    if version == 3:
        if tee_type != TEE_SGX:
            raise UnsupportedEvidenceError("quote v3 must carry an SGX report")
        return _sgx_body(r.take(SGX_BODY_LEN, "SGX report body"))
    if version == 4:
        if tee_type != TEE_TDX:
            raise UnsupportedEvidenceError("quote v4 is only supported for TDX")
        return _td_body(r.take(TD10_BODY_LEN, "TD report body"))
    body_type = r.u16("v5 body type")
    body_size = r.u32("v5 body size")
    kind = _V5_BODY.get(body_type)
    if kind is None:
        raise UnsupportedEvidenceError(f"quote v5 body type {body_type} is not supported")
    if body_size != kind[1]:
        raise EvidenceFormatError(f"quote v5 body type {body_type} must be {kind[1]} bytes")
    if kind[0] != ("sgx" if tee_type == TEE_SGX else "tdx"):
        raise EvidenceFormatError("quote v5 body type does not match the header's TEE type")
    raw = r.take(body_size, "v5 report body")
    return _sgx_body(raw) if kind[0] == "sgx" else _td_body(raw)


def _cert_data(r: _Reader, what: str) -> tuple[int, bytes]:
    cert_type = r.u16(f"{what} type")
    size = r.u32(f"{what} size")
    return cert_type, r.take(size, f"{what} data")


def _consumed(r: _Reader, what: str) -> None:
    if r.pos != r.end:
        raise EvidenceFormatError(f"{r.end - r.pos} unexpected bytes at the end of the {what}")


def _qe_section(r: _Reader) -> None:
    r.take(SGX_BODY_LEN, "QE report")
    r.take(64, "QE report signature")
    r.take(r.u16("QE auth data size"), "QE auth data")


def _signature_data(data: bytes, start: int, end: int, version: int) -> tuple[int, bytes]:
    """Walk the ECDSA signature data; returns (PCK chain cert data type, PCK chain)."""
    r = _Reader(data, start, end)
    r.take(64, "ISV report signature")
    r.take(64, "attestation public key")
    if version == 3:
        _qe_section(r)
        cert_type, cert = _cert_data(r, "certification data")
        if cert_type != CERT_PCK_CHAIN:
            raise UnsupportedEvidenceError(f"certification data type {cert_type} (need 5)")
        _consumed(r, "signature data")
        return cert_type, cert
    outer_type, outer = _cert_data(r, "certification data")
    if outer_type != CERT_QE_REPORT:
        raise UnsupportedEvidenceError(f"outer certification data type {outer_type} (need 6)")
    inner = _Reader(outer, 0, len(outer))
    _qe_section(inner)
    inner_type, chain = _cert_data(inner, "inner certification data")
    if inner_type != CERT_PCK_CHAIN:
        raise UnsupportedEvidenceError(f"inner certification data type {inner_type} (need 5)")
    _consumed(inner, "QE report certification data")
    _consumed(r, "signature data")
    return inner_type, chain


def _check_padding(data: bytes, end: int) -> int:
    """Bytes after ``end`` must be zero padding of at most MAX_QUOTE_PADDING; returns its size."""
    tail = data[end:]
    nonzero = tail.lstrip(b"\0")
    if nonzero:
        first = len(tail) - len(nonzero)
        raise EvidenceFormatError(
            f"non-zero byte {nonzero[0]:#04x} at offset {end + first}, {first} bytes after the "
            "signature data: only zero padding may follow it (those bytes are unsigned)"
        )
    if len(tail) > MAX_QUOTE_PADDING:
        raise EvidenceFormatError(
            f"{len(tail)} bytes of zero padding after the signature data exceed the bound of "
            f"{MAX_QUOTE_PADDING}"
        )
    return len(tail)


def parse_quote(data: bytes) -> Quote:
    """Parse a DCAP quote without verifying it.

    After the signature data only zero padding (at most :data:`MAX_QUOTE_PADDING` bytes) is
    accepted; any non-zero byte there is refused with :class:`EvidenceFormatError`.
    """
    if not isinstance(data, bytes | bytearray):
        raise EvidenceFormatError("a quote must be bytes")
    data = bytes(data)
    if len(data) > MAX_QUOTE_BYTES:
        raise EvidenceFormatError(f"quote of {len(data)} bytes exceeds {MAX_QUOTE_BYTES}")
    r = _Reader(data, 0, len(data))
    version, att_key_type, tee_type, vendor = _header(r)
    body = _body(r, version, tee_type)
    signed_end = r.pos
    sig_len = r.u32("signature data length")
    sig_start = r.pos
    r.take(sig_len, "signature data")
    cert_type, chain = _signature_data(data, sig_start, sig_start + sig_len, version)
    trailing = _check_padding(data, r.pos)
    return Quote(
        version=version,
        att_key_type=att_key_type,
        tee_type=tee_type,
        qe_vendor_id=vendor,
        body=body,
        signed_region=data[:signed_end],
        sig_data_len=sig_len,
        cert_data_type=cert_type,
        pck_chain=chain,
        trailing=trailing,
    )
