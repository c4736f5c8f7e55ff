"""Dev-PKI fixtures: a pinned clock, a dev enclave identity and a policy that trusts them."""

from __future__ import annotations

import hashlib
from typing import Any

from secure_ci.attestation import DevPKI, Policy, SimulatedProvider

__all__ = ["DEV_MRENCLAVE", "DEV_MRSIGNER", "DEV_NOW", "dev_pki", "dev_policy", "dev_provider"]

DEV_NOW = 1_750_400_000
"""2025-06-20: inside the real Intel sample collateral's window too, so one clock fits all."""
DEV_MRENCLAVE = hashlib.sha256(b"secure-ci dev enclave").digest()
DEV_MRSIGNER = hashlib.sha256(b"secure-ci dev enclave signer").digest()


def dev_pki(now: int = DEV_NOW, **options: Any) -> DevPKI:
    """A fresh :class:`DevPKI` at the pinned clock; ``options`` go to :meth:`DevPKI.generate`."""
    return DevPKI.generate(now, **options)


def dev_provider(pki: DevPKI, **identity: Any) -> SimulatedProvider:
    """A simulated enclave with the dev MRENCLAVE/MRSIGNER unless ``identity`` overrides them."""
    identity.setdefault("mrenclave", DEV_MRENCLAVE)
    identity.setdefault("mrsigner", DEV_MRSIGNER)
    return SimulatedProvider(pki, **identity)


def dev_policy(pki: DevPKI, **overrides: Any) -> Policy:
    """A policy trusting only ``pki``'s root and allowing :data:`DEV_MRENCLAVE`."""
    overrides.setdefault("mrenclave", frozenset({DEV_MRENCLAVE}))
    return Policy(roots=(pki.root_der,), **overrides)
