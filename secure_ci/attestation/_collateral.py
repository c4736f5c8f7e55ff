"""Collateral: the signed TCB info, QE identity and CRLs a quote is judged against.

A bundle is the JSON dcap-qvl serialises (``QuoteCollateralV3.to_json``): nine string fields.
We validate it ourselves (size, keys, types, dates, CRL DER) before dcap-qvl sees it, and
derive its validity window. Sources (:class:`FileCollateral`, :class:`PccsCollateral`) cache a
bundle until its ``next_update``, so collateral is never fetched per connection.
"""

from __future__ import annotations

import functools
import http.client
import json
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import dcap_qvl
from cryptography import x509

from secure_ci._encoding import digest
from secure_ci.attestation._errors import is_qvl_failure
from secure_ci.exceptions import CollateralError, EvidenceFormatError

__all__ = [
    "MAX_COLLATERAL_BYTES",
    "Collateral",
    "CollateralSource",
    "FileCollateral",
    "PccsCollateral",
]

MAX_COLLATERAL_BYTES = 256 * 1024
"""Real bundles are about 15 kB; anything far larger is refused before parsing."""

_KEYS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)


def _timestamp(value: object, what: str) -> int:
    if not isinstance(value, str) or len(value) > 40:
        raise EvidenceFormatError(f"collateral {what} is not a date string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise EvidenceFormatError(f"collateral {what} is not an ISO 8601 date") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def _signed_json_window(text: str, what: str) -> tuple[int, int]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise EvidenceFormatError(f"collateral {what} is not JSON") from exc
    if not isinstance(value, dict):
        raise EvidenceFormatError(f"collateral {what} is not a JSON object")
    issue = _timestamp(value.get("issueDate"), f"{what}.issueDate")
    next_update = _timestamp(value.get("nextUpdate"), f"{what}.nextUpdate")
    if next_update < issue:
        raise EvidenceFormatError(f"collateral {what} expires before it is issued")
    return issue, next_update


def _crl_window(hex_der: str, what: str) -> tuple[int, int]:
    try:
        crl = x509.load_der_x509_crl(bytes.fromhex(hex_der))
        this_update, next_update = crl.last_update_utc, crl.next_update_utc
    except ValueError as exc:
        raise EvidenceFormatError(f"collateral {what} is not a hex DER CRL") from exc
    if next_update is None:
        raise EvidenceFormatError(f"collateral {what} has no nextUpdate")
    return int(this_update.timestamp()), int(next_update.timestamp())


@dataclass(frozen=True)
class Collateral:
    """A validated collateral bundle. Build it with :meth:`from_json`.

    ``issue_date`` is the oldest of the TCB info and QE identity issue dates and the PCK CRL's
    thisUpdate (the root CA CRL is renewed yearly, so it is left out of the age);
    ``next_update`` is the earliest nextUpdate of all four signed parts.
    """

    fields: tuple[tuple[str, str], ...]
    issue_date: int
    next_update: int
    _qvl: Any = field(compare=False, repr=False, hash=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Collateral:
        if len(text) > MAX_COLLATERAL_BYTES:
            raise EvidenceFormatError(f"collateral larger than {MAX_COLLATERAL_BYTES} bytes")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise EvidenceFormatError("collateral is not JSON") from exc
        if not isinstance(value, dict):
            raise EvidenceFormatError("collateral is not a JSON object")
        if set(value) != set(_KEYS):
            missing, extra = set(_KEYS) - set(value), set(value) - set(_KEYS)
            raise EvidenceFormatError(
                f"collateral keys wrong: missing {sorted(missing)}, unexpected {sorted(extra)}"
            )
        if not all(isinstance(value[k], str) for k in _KEYS):
            raise EvidenceFormatError("every collateral field must be a string")
        windows = [
            _signed_json_window(value["tcb_info"], "tcb_info"),
            _signed_json_window(value["qe_identity"], "qe_identity"),
            _crl_window(value["pck_crl"], "pck_crl"),
        ]
        root_window = _crl_window(value["root_ca_crl"], "root_ca_crl")
        fields = tuple((k, value[k]) for k in _KEYS)
        canonical = json.dumps(dict(fields))
        try:
            qvl = dcap_qvl.QuoteCollateralV3.from_json(canonical)
        except BaseException as exc:
            if not is_qvl_failure(exc):
                raise
            raise EvidenceFormatError(f"dcap-qvl cannot load the collateral: {exc}") from exc
        return cls(
            fields=fields,
            issue_date=min(w[0] for w in windows),
            next_update=min([root_window[1], *(w[1] for w in windows)]),
            _qvl=qvl,
        )

    @property
    def json(self) -> str:
        """The bundle as dcap-qvl serialises it (stable key order)."""
        return json.dumps(dict(self.fields))

    @functools.cached_property
    def digest(self) -> str:
        """Hex domain-separated SHA-256 of the canonical content (what the ledger records)."""
        return digest("attestation/collateral", dict(self.fields)).hex()

    def to_qvl(self) -> Any:
        """The ``dcap_qvl.QuoteCollateralV3`` for this bundle."""
        return self._qvl

    def check_fresh(self, now: int) -> None:
        if now < self.issue_date:
            raise CollateralError(
                f"collateral is not yet valid at {now} (issued {self.issue_date})"
            )
        if now > self.next_update:
            raise CollateralError(f"collateral expired at {self.next_update} (now {now})")


class CollateralSource(Protocol):
    """Where collateral comes from; ``get`` may return a cached bundle valid at ``now``."""

    def get(self, now: int) -> Collateral: ...


class _Cached:
    """Shared caching: keep a bundle until its next_update, refuse an already expired one."""

    def __init__(self, load: Callable[[], bytes]) -> None:
        self._load = load
        self._cached: Collateral | None = None
        self.loads = 0

    def get(self, now: int) -> Collateral:
        cached = self._cached
        if cached is not None and cached.issue_date <= now <= cached.next_update:
            return cached
        self.loads += 1
        fresh = Collateral.from_json(self._load())
        fresh.check_fresh(now)
        self._cached = fresh
        return fresh


class FileCollateral(_Cached):
    """An offline bundle file, read once and kept until its next_update."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(self._read)

    def _read(self) -> bytes:
        try:
            with self.path.open("rb") as f:
                return f.read(MAX_COLLATERAL_BYTES + 1)
        except OSError as exc:
            raise CollateralError(f"cannot read collateral {self.path}: {exc}") from exc


def fetch_url(url: str, max_bytes: int = MAX_COLLATERAL_BYTES, timeout: float = 10.0) -> bytes:
    """GET ``url`` (http/https only) and return at most ``max_bytes + 1`` bytes."""
    if not url.startswith(("http://", "https://")):
        raise CollateralError(f"collateral URL must be http(s): {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (scheme checked)
            body: bytes = resp.read(max_bytes + 1)
            return body
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise CollateralError(f"cannot fetch collateral from {url}: {exc}") from exc


class PccsCollateral(_Cached):
    """Collateral fetched over HTTP, cached until its next_update.

    ``url`` must serve a *full bundle* (the JSON dcap-qvl serialises), e.g. a PCCS front end or
    a static file; assembling a bundle from the individual PCCS endpoints is not done here.
    ``fetch`` is injectable so tests and offline deployments control the IO.
    """

    def __init__(self, url: str, *, fetch: Callable[[str], bytes] = fetch_url) -> None:
        self.url = url
        self._fetch = fetch
        super().__init__(lambda: self._fetch(self.url))
