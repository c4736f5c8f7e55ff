"""The edge service: attested TLS sessions, cross-device batching, tail runner, signed results.

``async with open_edge(config, provider=..., models=...) as edge`` serves on ``edge.port``;
``load_edge_config`` parses the TOML configuration; ``render_manifest`` builds the Gramine
manifest the edge runs under. Importing this package imports torch (it runs tails).
"""

from __future__ import annotations

from secure_ci.edge._batcher import Batcher, BatchLimits
from secure_ci.edge._config import (
    EdgeConfig,
    EdgeLimits,
    ModelSpec,
    format_address,
    load_edge_config,
    parse_address,
)
from secure_ci.edge._identity import EnclaveIdentity, MemoryJournal, RecordSink, create_identity
from secure_ci.edge._manifest import REQUIRED_MANIFEST_KEYS, render_manifest, validate_manifest
from secure_ci.edge._models import (
    ModelRegistry,
    TailEntry,
    load_zoo_tails,
    tails_from_partitioner,
)
from secure_ci.edge._service import EdgeService, open_edge

__all__ = [
    "REQUIRED_MANIFEST_KEYS",
    "BatchLimits",
    "Batcher",
    "EdgeConfig",
    "EdgeLimits",
    "EdgeService",
    "EnclaveIdentity",
    "MemoryJournal",
    "ModelRegistry",
    "ModelSpec",
    "RecordSink",
    "TailEntry",
    "create_identity",
    "format_address",
    "load_edge_config",
    "load_zoo_tails",
    "open_edge",
    "parse_address",
    "render_manifest",
    "tails_from_partitioner",
    "validate_manifest",
]
