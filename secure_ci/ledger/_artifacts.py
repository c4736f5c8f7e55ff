"""The compiled SecureCILedger contract (committed under ``artifacts/``) and revert decoding.

The artifact is produced by ``ledger/scripts/build.mjs`` with the pinned solcjs; a test
recompiles it when node is available and fails on any drift. Revert data comes from a node
we do not trust, so :func:`decode_revert` never raises: unknown data becomes a descriptive
name instead of an exception.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from eth_abi.abi import decode as abi_decode
from eth_abi.exceptions import DecodingError
from eth_utils.crypto import keccak

from secure_ci.exceptions import LedgerError

__all__ = ["ContractArtifact", "decode_revert", "load_artifact", "parse_artifact"]

MAX_ARTIFACT_BYTES = 4 << 20
_ERROR_STRING = bytes.fromhex("08c379a0")  # Error(string)
_PANIC = bytes.fromhex("4e487b71")  # Panic(uint256)


@dataclass(frozen=True)
class ContractArtifact:
    """ABI, bytecode and provenance of one compiled contract."""

    name: str
    abi: tuple[Mapping[str, Any], ...]
    bytecode: bytes
    deployed_bytecode: bytes
    solc_version: str
    source_hash: str
    sources: Mapping[str, str]

    @functools.cached_property
    def errors(self) -> Mapping[bytes, tuple[str, tuple[str, ...]]]:
        """Custom error selector -> (name, argument types), from the ABI."""
        table: dict[bytes, tuple[str, tuple[str, ...]]] = {}
        for entry in self.abi:
            if entry.get("type") != "error":
                continue
            types = tuple(_abi_type(arg) for arg in entry.get("inputs", ()))
            signature = f"{entry['name']}({','.join(types)})"
            table[keccak(text=signature)[:4]] = (str(entry["name"]), types)
        return table

    def source_matches(self, source: bytes) -> bool:
        """True when ``source`` is the Solidity text this artifact was compiled from."""
        return hashlib.sha256(source).hexdigest() == self.source_hash


def _abi_type(arg: Mapping[str, Any]) -> str:
    kind = str(arg["type"])
    if kind.startswith("tuple"):
        inner = ",".join(_abi_type(c) for c in arg.get("components", ()))
        return f"({inner}){kind[len('tuple') :]}"
    return kind


def _hex_bytes(name: str, value: object) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise LedgerError(f"artifact: {name} is not a 0x-prefixed hex string")
    try:
        return bytes.fromhex(value[2:])
    except ValueError as exc:
        raise LedgerError(f"artifact: {name} is not valid hex") from exc


def parse_artifact(raw: bytes) -> ContractArtifact:
    """Validate and parse an artifact JSON document (as written by ``build.mjs``)."""
    if len(raw) > MAX_ARTIFACT_BYTES:
        raise LedgerError(f"artifact: {len(raw)} bytes exceeds {MAX_ARTIFACT_BYTES}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise LedgerError("artifact: not valid JSON") from exc
    if not isinstance(doc, dict):
        raise LedgerError("artifact: top level is not an object")
    abi = doc.get("abi")
    if not isinstance(abi, list) or not all(
        isinstance(e, dict) and isinstance(e.get("type"), str) for e in abi
    ):
        raise LedgerError("artifact: abi is not a list of typed entries")
    for entry in abi:
        inputs = entry.get("inputs", [])
        if entry["type"] in ("error", "function", "event") and not isinstance(
            entry.get("name"), str
        ):
            raise LedgerError("artifact: abi entry without a name")
        if not isinstance(inputs, list) or not all(
            isinstance(i, dict) and isinstance(i.get("type"), str) for i in inputs
        ):
            raise LedgerError("artifact: abi entry with malformed inputs")
    strings = {k: doc.get(k) for k in ("contractName", "solcVersion", "sourceHash")}
    for key, value in strings.items():
        if not isinstance(value, str) or not value:
            raise LedgerError(f"artifact: {key} missing")
    sources = doc.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise LedgerError("artifact: sources is not a map of hashes")
    bytecode = _hex_bytes("bytecode", doc.get("bytecode"))
    if not bytecode:
        raise LedgerError("artifact: empty bytecode")
    try:
        artifact = ContractArtifact(
            name=str(strings["contractName"]),
            abi=tuple(abi),
            bytecode=bytecode,
            deployed_bytecode=_hex_bytes("deployedBytecode", doc.get("deployedBytecode")),
            solc_version=str(strings["solcVersion"]),
            source_hash=str(strings["sourceHash"]),
            sources=dict(sources),
        )
        _ = artifact.errors  # ABI error entries must be well-formed
    except (KeyError, TypeError) as exc:
        raise LedgerError("artifact: malformed abi error entry") from exc
    return artifact


@functools.cache
def load_artifact(name: str = "SecureCILedger") -> ContractArtifact:
    """The committed artifact shipped inside the package."""
    if not name.isidentifier():
        raise LedgerError(f"artifact name {name!r} is not an identifier")
    try:
        raw = (
            resources.files("secure_ci.ledger")
            .joinpath("artifacts")
            .joinpath(f"{name}.json")
            .read_bytes()
        )
    except OSError as exc:
        raise LedgerError(f"artifact {name} is missing from the package") from exc
    return parse_artifact(raw)


def decode_revert(artifact: ContractArtifact, data: bytes) -> str:
    """The reason of a revert: custom error name, ``Error(string)`` text or a description."""
    selector, payload = data[:4], data[4:]
    if not data:
        return "execution reverted"
    if selector in artifact.errors:
        return artifact.errors[selector][0]
    try:
        if selector == _ERROR_STRING:
            (text,) = abi_decode(["string"], payload)
            return str(text)
        if selector == _PANIC:
            (code,) = abi_decode(["uint256"], payload)
            return f"Panic(0x{code:02x})"
    except (DecodingError, OverflowError, ValueError, TypeError):
        pass
    return f"unknown revert 0x{data[:36].hex()}"
