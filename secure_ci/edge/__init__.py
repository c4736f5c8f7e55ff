"""The edge service: attested TLS sessions, cross-device batching, tail runner, signed results.

``async with open_edge(config, provider=..., models=...) as edge`` serves on ``edge.port``;
``load_edge_config`` parses the TOML configuration; ``render_manifest`` builds the Gramine
manifest the edge runs under; ``open_edge_ledger`` registers the edge on the shared ledger,
admits the chain's registered devices and anchors the journal (the ``[ledger]`` table).
Importing this package imports torch (it runs tails).
"""

from __future__ import annotations

from secure_ci.edge._batcher import Batcher, BatchLimits, TailWorker
from secure_ci.edge._config import (
    EdgeConfig,
    EdgeLimits,
    LedgerSettings,
    ModelSpec,
    format_address,
    load_edge_config,
    parse_address,
)
from secure_ci.edge._identity import EnclaveIdentity, MemoryJournal, RecordSink, create_identity
from secure_ci.edge._ledger import DeviceLog, EdgeLedger, RegisteredDevices, open_edge_ledger
from secure_ci.edge._manifest import REQUIRED_MANIFEST_KEYS, render_manifest, validate_manifest
from secure_ci.edge._models import (
    ModelRegistry,
    TailEntry,
    load_model_tails,
    load_zoo_tails,
    tails_from_partitioner,
)
from secure_ci.edge._service import EdgeService, open_edge

__all__ = [
    "REQUIRED_MANIFEST_KEYS",
    "BatchLimits",
    "Batcher",
    "DeviceLog",
    "EdgeConfig",
    "EdgeLedger",
    "EdgeLimits",
    "EdgeService",
    "EnclaveIdentity",
    "LedgerSettings",
    "MemoryJournal",
    "ModelRegistry",
    "ModelSpec",
    "RecordSink",
    "RegisteredDevices",
    "TailEntry",
    "TailWorker",
    "create_identity",
    "format_address",
    "load_edge_config",
    "load_model_tails",
    "load_zoo_tails",
    "open_edge",
    "open_edge_ledger",
    "parse_address",
    "render_manifest",
    "tails_from_partitioner",
    "validate_manifest",
]
