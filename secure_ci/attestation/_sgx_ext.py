"""DER of Intel's SGX PCK certificate extension (OID 1.2.840.113741.1.13.1), built by hand.

``cryptography`` cannot express this extension's structure, so it is assembled from
asn1crypto primitives in exactly the layout of Intel's PCK leaf certificates: PPID, TCB
(16 component SVNs, PCESVN, CPUSVN), PCE-ID, FMSPC and SGX type. dcap-qvl compares the
CPUSVN bytes with the TCB levels, so the 16 INTEGER components are derived from them.
"""

from __future__ import annotations

from asn1crypto import core

from secure_ci.exceptions import ConfigError

__all__ = ["SGX_EXTENSION_OID", "sgx_extension_der"]

SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _seq(*items: bytes) -> bytes:
    body = b"".join(items)
    return b"\x30" + _length(len(body)) + body


def _pair(oid: str, value_der: bytes) -> bytes:
    return _seq(core.ObjectIdentifier(oid).dump(), value_der)


def sgx_extension_der(
    *, ppid: bytes, cpusvn: bytes, pcesvn: int, pce_id: bytes, fmspc: bytes
) -> bytes:
    """The extension value (the contents of its extnValue OCTET STRING)."""
    if len(ppid) != 16 or len(cpusvn) != 16 or len(pce_id) != 2 or len(fmspc) != 6:
        raise ConfigError("SGX extension: ppid/cpusvn 16 bytes, pce_id 2, fmspc 6")
    if not 0 <= pcesvn <= 0xFFFF:
        raise ConfigError(f"SGX extension: pcesvn {pcesvn} out of range")
    base = SGX_EXTENSION_OID
    components = [
        _pair(f"{base}.2.{i + 1}", core.Integer(svn).dump()) for i, svn in enumerate(cpusvn)
    ]
    tcb = _seq(
        *components,
        _pair(f"{base}.2.17", core.Integer(pcesvn).dump()),
        _pair(f"{base}.2.18", core.OctetString(cpusvn).dump()),
    )
    return _seq(
        _pair(f"{base}.1", core.OctetString(ppid).dump()),
        _pair(f"{base}.2", tcb),
        _pair(f"{base}.3", core.OctetString(pce_id).dump()),
        _pair(f"{base}.4", core.OctetString(fmspc).dump()),
        _pair(f"{base}.5", b"\x0a\x01\x00"),  # ENUMERATED sgxType 0 = Standard
    )
