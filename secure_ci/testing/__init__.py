"""Public fakes and fixtures for testing code that uses secure-ci (and for secure-ci's tests)."""

from __future__ import annotations

from secure_ci.testing._attestation import (
    DEV_MRENCLAVE,
    DEV_MRSIGNER,
    DEV_NOW,
    dev_pki,
    dev_policy,
    dev_provider,
)
from secure_ci.testing._edge import DevEnclave, RawDevice, dev_enclave, new_device_key
from secure_ci.testing._ledger_world import LedgerWorld, ledger_world
from secure_ci.testing._memory_ledger import MemoryLedger, sample_requests, sample_tasks
from secure_ci.testing._netns import KernelShaper, TbfStats, in_namespace, inside_namespace
from secure_ci.testing._protocol import connected_pair, pump, sample_events, sample_request
from secure_ci.testing._quote_fuzz import FuzzReport, fuzz_verifier, mutate_quote, quote_regions
from secure_ci.testing._shaper import (
    Link,
    LinkClose,
    LinkShaper,
    ShaperStats,
    ThreadedShaper,
    open_link_shaper,
    shaper_thread,
)

__all__: list[str] = [
    "DEV_MRENCLAVE",
    "DEV_MRSIGNER",
    "DEV_NOW",
    "DevEnclave",
    "FuzzReport",
    "KernelShaper",
    "LedgerWorld",
    "Link",
    "LinkClose",
    "LinkShaper",
    "MemoryLedger",
    "RawDevice",
    "ShaperStats",
    "TbfStats",
    "ThreadedShaper",
    "connected_pair",
    "dev_enclave",
    "dev_pki",
    "dev_policy",
    "dev_provider",
    "fuzz_verifier",
    "in_namespace",
    "inside_namespace",
    "ledger_world",
    "mutate_quote",
    "new_device_key",
    "open_link_shaper",
    "pump",
    "quote_regions",
    "sample_events",
    "sample_request",
    "sample_requests",
    "sample_tasks",
    "shaper_thread",
]
