"""Attestation policy: which roots, enclaves, TCB statuses and freshness we accept.

The Intel SGX Root CA ships in the package and is pinned by the SHA-256 fingerprint of its DER
certificate: a root is "Intel" because of its key, never because of its name (an impostor with
Intel's exact subject DN exists in the test data).
"""

from __future__ import annotations

import functools
import hashlib
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from secure_ci._encoding import digest
from secure_ci.exceptions import ConfigError

__all__ = [
    "INTEL_ROOT_FINGERPRINT",
    "TCB_STATUSES",
    "MrSignerRule",
    "Policy",
    "intel_root_der",
]

INTEL_ROOT_FINGERPRINT = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
"""SHA-256 of the DER Intel SGX Root CA certificate (Intel publishes it as 44:A0:19:6B:...)."""

TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
    }
)
"""Statuses a policy may accept. ``Revoked`` is never acceptable (dcap-qvl refuses it too)."""

_TOML_KEYS = frozenset(
    {
        "roots",
        "mrenclave",
        "mrsigner",
        "isvprodid",
        "min_isvsvn",
        "mrtd",
        "rtmr0",
        "rtmr1",
        "rtmr2",
        "rtmr3",
        "rtmr_any",
        "allow_debug",
        "tcb_status",
        "advisories",
        "max_collateral_age_days",
        "require_nonce",
    }
)


def intel_root_der() -> bytes:
    """The vendored Intel SGX Root CA, refused unless it matches the pinned fingerprint."""
    der = resources.files("secure_ci.attestation").joinpath("roots/intel-sgx-root-ca.der")
    data = der.read_bytes()
    if hashlib.sha256(data).hexdigest() != INTEL_ROOT_FINGERPRINT:
        raise ConfigError("vendored Intel SGX Root CA does not match its pinned fingerprint")
    return data


@dataclass(frozen=True)
class MrSignerRule:
    """Accept any enclave signed by ``mrsigner`` with this product id and at least this SVN."""

    mrsigner: bytes
    isv_prod_id: int = 0
    min_isv_svn: int = 0

    def __post_init__(self) -> None:
        _check_bytes(self.mrsigner, 32, "mrsigner")
        _check_u16(self.isv_prod_id, "isvprodid")
        _check_u16(self.min_isv_svn, "min_isvsvn")


def _check_bytes(value: object, size: int, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise ConfigError(f"{what} must be {size} bytes")


def _check_u16(value: object, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
        raise ConfigError(f"{what} must be an integer in 0..65535")


def _no_rtmrs() -> tuple[frozenset[bytes], ...]:
    return (frozenset(), frozenset(), frozenset(), frozenset())


@dataclass(frozen=True)
class Policy:
    """What a verifier accepts. Immutable and validated at construction.

    An empty ``mrtd`` accepts no TD, and empty ``mrenclave`` and ``mrsigner`` accept no SGX
    enclave. MRTD measures only the TD's initial image (firmware); the workload is measured
    into the RTMRs. So a policy that accepts TDs must pin every RTMR (``rtmrs[i]``, the
    allowed values of RTMR i) or say explicitly that it accepts any workload
    (``rtmr_any=True``, with no RTMR lists); anything else is a ConfigError.
    """

    roots: tuple[bytes, ...] = field(default_factory=lambda: (intel_root_der(),))
    mrenclave: frozenset[bytes] = frozenset()
    mrsigner: tuple[MrSignerRule, ...] = ()
    mrtd: frozenset[bytes] = frozenset()
    rtmrs: tuple[frozenset[bytes], ...] = field(default_factory=_no_rtmrs)
    rtmr_any: bool = False
    allow_debug: bool = False
    tcb_status: frozenset[str] = frozenset({"UpToDate"})
    advisories: frozenset[str] = frozenset()
    max_collateral_age_days: int = 30
    require_nonce: bool = False

    def __post_init__(self) -> None:
        if not self.roots:
            raise ConfigError("a policy needs at least one trusted root")
        for root in self.roots:
            try:
                x509.load_der_x509_certificate(root)
            except (ValueError, TypeError) as exc:
                raise ConfigError("a policy root is not a DER X.509 certificate") from exc
        for value in self.mrenclave:
            _check_bytes(value, 32, "mrenclave")
        for rule in self.mrsigner:
            if not isinstance(rule, MrSignerRule):
                raise ConfigError("mrsigner entries must be MrSignerRule")
        for value in self.mrtd:
            _check_bytes(value, 48, "mrtd")
        if len(self.rtmrs) != 4:
            raise ConfigError("rtmrs must hold four allow-lists")
        for allowed in self.rtmrs:
            for value in allowed:
                _check_bytes(value, 48, "rtmr")
        self._check_rtmr_pinning()
        unknown = set(self.tcb_status) - TCB_STATUSES
        if unknown or not self.tcb_status:
            raise ConfigError(f"tcb_status must be a non-empty subset of {sorted(TCB_STATUSES)}")
        if not all(isinstance(a, str) and 0 < len(a) <= 64 for a in self.advisories):
            raise ConfigError("advisories must be short non-empty strings")
        age = self.max_collateral_age_days
        if not isinstance(age, int) or isinstance(age, bool) or not 0 < age <= 3650:
            raise ConfigError("max_collateral_age_days must be an integer in 1..3650")

    def _check_rtmr_pinning(self) -> None:
        if not isinstance(self.rtmr_any, bool):
            raise ConfigError("rtmr_any must be a boolean")
        if self.rtmr_any:
            if any(self.rtmrs):
                raise ConfigError(
                    "rtmr_any = true accepts any RTMR values: it cannot be combined with "
                    "rtmr0..rtmr3 lists"
                )
            return
        unpinned = [f"rtmr{i}" for i, allowed in enumerate(self.rtmrs) if not allowed]
        if self.mrtd and unpinned:
            raise ConfigError(
                f"a TDX policy (mrtd) must pin every RTMR, {', '.join(unpinned)} not pinned: "
                "list their allowed values, or set rtmr_any = true to accept any workload "
                "in these TDs"
            )

    def root_fingerprints(self) -> tuple[str, ...]:
        return tuple(hashlib.sha256(r).hexdigest() for r in self.roots)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, canonical content of the policy (sorted lists, hex bytes)."""
        return {
            "roots": sorted(self.root_fingerprints()),
            "mrenclave": sorted(m.hex() for m in self.mrenclave),
            "mrsigner": sorted(
                [r.mrsigner.hex(), r.isv_prod_id, r.min_isv_svn] for r in self.mrsigner
            ),
            "mrtd": sorted(m.hex() for m in self.mrtd),
            "rtmrs": [sorted(m.hex() for m in allowed) for allowed in self.rtmrs],
            "rtmr_any": self.rtmr_any,
            "allow_debug": self.allow_debug,
            "tcb_status": sorted(self.tcb_status),
            "advisories": sorted(self.advisories),
            "max_collateral_age_days": self.max_collateral_age_days,
            "require_nonce": self.require_nonce,
        }

    @functools.cached_property
    def digest(self) -> str:
        """Hex domain-separated SHA-256 of :meth:`to_dict` (what the ledger records)."""
        return digest("attestation/policy", self.to_dict()).hex()

    @classmethod
    def from_toml(cls, text: str, *, base_dir: Path) -> Policy:
        """Build a policy from the ``[attestation]`` table of a TOML document.

        Keys (all optional): ``roots`` (``"intel"``, the pinned vendored root, or PEM paths
        relative to ``base_dir``; default ``["intel"]``), ``mrenclave`` / ``mrsigner`` (hex,
        32 bytes; ``isvprodid`` and ``min_isvsvn`` apply to every mrsigner), ``mrtd`` and
        ``rtmr0``..``rtmr3`` (hex, 48 bytes; with ``mrtd`` every RTMR must be listed unless
        ``rtmr_any = true``), ``allow_debug``,
        ``tcb_status``, ``advisories`` (ids or ``"*"``), ``max_collateral_age_days``,
        ``require_nonce``. Unknown keys, bad hex and wrong lengths raise ConfigError.
        """
        try:
            document = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, RecursionError) as exc:
            raise ConfigError(f"policy is not valid TOML: {exc}") from exc
        table = document.get("attestation")
        if not isinstance(table, dict):
            raise ConfigError("policy needs an [attestation] table")
        unknown = set(table) - _TOML_KEYS
        if unknown:
            raise ConfigError(f"unknown [attestation] keys: {sorted(unknown)}")
        isvprodid = _typed(table, "isvprodid", int, 0)
        min_svn = _typed(table, "min_isvsvn", int, 0)
        _check_u16(isvprodid, "isvprodid")
        _check_u16(min_svn, "min_isvsvn")
        return cls(
            roots=_load_roots(table.get("roots", ["intel"]), base_dir),
            mrenclave=frozenset(_hex_list(table, "mrenclave", 32)),
            mrsigner=tuple(
                MrSignerRule(m, isvprodid, min_svn) for m in _hex_list(table, "mrsigner", 32)
            ),
            mrtd=frozenset(_hex_list(table, "mrtd", 48)),
            rtmrs=tuple(frozenset(_hex_list(table, f"rtmr{i}", 48)) for i in range(4)),
            rtmr_any=_typed(table, "rtmr_any", bool, False),
            allow_debug=_typed(table, "allow_debug", bool, False),
            tcb_status=frozenset(_str_list(table, "tcb_status", ["UpToDate"])),
            advisories=frozenset(_str_list(table, "advisories", [])),
            max_collateral_age_days=_typed(table, "max_collateral_age_days", int, 30),
            require_nonce=_typed(table, "require_nonce", bool, False),
        )


def _typed(table: dict[str, Any], key: str, kind: type[Any], default: Any) -> Any:
    value = table.get(key, default)
    if type(value) is not kind:
        raise ConfigError(f"[attestation] {key} must be a {kind.__name__}")
    return value


def _str_list(table: dict[str, Any], key: str, default: list[str]) -> list[str]:
    value = table.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"[attestation] {key} must be a list of strings")
    if len(value) > 1024:
        raise ConfigError(f"[attestation] {key} is too long")
    return value


def _hex_list(table: dict[str, Any], key: str, size: int) -> list[bytes]:
    out = []
    for item in _str_list(table, key, []):
        text = item.removeprefix("0x")
        try:
            value = bytes.fromhex(text)
        except ValueError as exc:
            raise ConfigError(f"[attestation] {key} entry {item[:20]!r} is not hex") from exc
        if len(value) != size:
            raise ConfigError(f"[attestation] {key} entries must be {size} bytes of hex")
        out.append(value)
    return out


def _load_roots(value: object, base_dir: Path) -> tuple[bytes, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError('[attestation] roots must be a non-empty list like ["intel"]')
    roots: list[bytes] = []
    for item in value:
        if item == "intel":
            roots.append(intel_root_der())
            continue
        path = base_dir / item
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"root {item!r}: cannot load a PEM certificate: {exc}") from exc
        roots.extend(c.public_bytes(Encoding.DER) for c in certs)
    return tuple(roots)
