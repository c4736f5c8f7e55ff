"""Evidence providers: where an enclave gets its quotes.

``GramineProvider`` talks to Gramine's ``/dev/attestation`` pseudo-files (write 64 bytes of
``user_report_data``, read ``quote``); ``SimulatedProvider`` mints dev quotes from a
:class:`DevPKI`. Both produce the same DCAP v3 bytes, so everything downstream (RA-TLS
certificates, verification, the ledger) takes one path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from secure_ci.attestation._collateral import Collateral
from secure_ci.attestation._devpki import DevPKI
from secure_ci.exceptions import AttestationError, ConfigError, EvidenceFormatError

__all__ = [
    "GRAMINE_ATTESTATION_DIR",
    "EvidenceProvider",
    "GramineProvider",
    "SimulatedProvider",
    "open_provider",
]

GRAMINE_ATTESTATION_DIR = Path("/dev/attestation")
REPORT_DATA_LEN = 64
MAX_QUOTE_BYTES = 64 * 1024
_MAX_TYPE_BYTES = 64
_GRAMINE_LOCK = threading.Lock()


@runtime_checkable
class EvidenceProvider(Protocol):
    """Produces quotes whose 64-byte report data the caller chooses."""

    @property
    def attestation_type(self) -> str: ...

    def quote(self, report_data: bytes) -> bytes: ...

    def collateral(self) -> Collateral | None:
        """Collateral to ship with the evidence, or None when the verifier fetches it."""
        ...


def _check_report_data(report_data: bytes) -> bytes:
    if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_LEN:
        raise ConfigError(f"report data must be exactly {REPORT_DATA_LEN} bytes")
    return bytes(report_data)


@dataclass(frozen=True)
class SimulatedProvider:
    """Dev quotes for a chosen enclave identity, signed by a local :class:`DevPKI`."""

    pki: DevPKI
    mrenclave: bytes
    mrsigner: bytes
    isv_prod_id: int = 0
    isv_svn: int = 0
    debug: bool = False

    @property
    def attestation_type(self) -> str:
        return "simulated"

    def quote(self, report_data: bytes) -> bytes:
        return self.pki.quote(
            report_data=_check_report_data(report_data),
            mrenclave=self.mrenclave,
            mrsigner=self.mrsigner,
            isv_prod_id=self.isv_prod_id,
            isv_svn=self.isv_svn,
            debug=self.debug,
        )

    def collateral(self) -> Collateral:
        return self.pki.collateral


@dataclass(frozen=True)
class GramineProvider:
    """Quotes from Gramine's ``/dev/attestation`` interface (SGX DCAP)."""

    root: Path = GRAMINE_ATTESTATION_DIR

    @property
    def attestation_type(self) -> str:
        """The attestation type Gramine reports; only ``dcap`` yields verifiable quotes."""
        raw = self._read("attestation_type", _MAX_TYPE_BYTES)
        try:
            kind = raw.decode("ascii").strip()
        except UnicodeDecodeError as exc:
            raise EvidenceFormatError("attestation_type is not ASCII") from exc
        if kind == "none":
            raise AttestationError(
                "Gramine reports attestation_type 'none': remote attestation is disabled; set "
                'sgx.remote_attestation = "dcap" in the manifest and run under gramine-sgx'
            )
        if kind != "dcap":
            raise AttestationError(
                f"Gramine attestation type {kind!r} is not supported (need dcap)"
            )
        return kind

    def quote(self, report_data: bytes) -> bytes:
        report_data = _check_report_data(report_data)
        _ = self.attestation_type
        # /dev/attestation is process-global: write report data and read its quote atomically,
        # or two concurrent challenges could each get the other's nonce.
        with _GRAMINE_LOCK:
            try:
                # Gramine regenerates the quote when user_report_data is written.
                (self.root / "user_report_data").write_bytes(report_data)
            except OSError as exc:
                raise AttestationError(f"cannot write Gramine user_report_data: {exc}") from exc
            quote = self._read("quote", MAX_QUOTE_BYTES)
        if not quote:
            raise EvidenceFormatError("Gramine returned an empty quote")
        return quote

    def collateral(self) -> None:
        return None

    def _read(self, name: str, limit: int) -> bytes:
        try:
            with (self.root / name).open("rb") as f:
                data = f.read(limit + 1)
        except OSError as exc:
            raise AttestationError(f"cannot read Gramine {self.root / name}: {exc}") from exc
        if len(data) > limit:
            raise EvidenceFormatError(f"Gramine {name} is larger than {limit} bytes")
        return data


def open_provider(
    kind: Literal["auto", "gramine", "simulated"] = "auto",
    *,
    gramine_root: Path = GRAMINE_ATTESTATION_DIR,
    simulated: SimulatedProvider | None = None,
) -> EvidenceProvider:
    """Pick a provider: ``auto`` is Gramine when ``gramine_root`` exists, simulated otherwise."""
    if kind == "auto":
        kind = "gramine" if gramine_root.is_dir() else "simulated"
    if kind == "gramine":
        return GramineProvider(gramine_root)
    if kind == "simulated":
        if simulated is None:
            raise ConfigError("the simulated provider needs a SimulatedProvider configuration")
        return simulated
    raise ConfigError(f"unknown evidence provider {kind!r} (auto, gramine, simulated)")
