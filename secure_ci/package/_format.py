"""The model package container: one file, a manifest, the weights, the exit heads, and a digest.

Byte layout, format version 2 (integers little-endian)::

    offset        size  field
    0             6     magic b"SCIPKG"
    6             1     format version, 2
    7             1     flags, 0 (any other value is refused)
    8             4     M: manifest length, u32, 2 <= M <= MAX_MANIFEST_BYTES
    12            M     manifest: canonical JSON (UTF-8, see below)
    12+M          8     W: weights length, u64, W <= MAX_WEIGHTS_BYTES
    20+M          W     weights: a safetensors file (8-byte header length, JSON header, data)
    20+M+W        8     X: exit heads length, u64, X <= MAX_EXITS_BYTES (0: no exit heads)
    28+M+W        X     exit heads: a safetensors file, or nothing when X = 0
    28+M+W+X      32    SHA-256( b"secure-ci/model-package/v2" || bytes[0 : 28+M+W+X] )

The weights section is exactly the model's state dict (what ``model_id`` digests); the exit
heads, trained after the model and not part of its identity, have their own section (tensor
names and manifest fields in :mod:`secure_ci.package._exit_manifest`).

Version 1 files (no exit heads section: the digest follows the weights and is taken with the
domain ``b"secure-ci/model-package/v1"``) are still read, as packages without exit heads.

The file ends exactly after the digest: a truncated file, appended bytes, or any changed
byte before the digest is refused. The manifest also carries the SHA-256 of the weights
section (and of the exit heads section), so the manifest alone pins them.

Canonical JSON is what ``json.dumps(value, sort_keys=True, separators=(",", ":"),
ensure_ascii=True, allow_nan=False)`` writes: sorted keys, no whitespace, ASCII only,
integers as written, floats in Python's shortest round-trip form. The reader refuses input
that is not in that exact form, duplicate keys, NaN/Infinity, nesting deeper than
``MAX_JSON_DEPTH`` (measured on the bytes, before the parser runs) and oversized input,
before any value is interpreted.

The digest detects corruption and edits, but anyone can recompute it: what authenticates a
package is its ``model_id`` (architecture + weights), which the loader recomputes from the
rebuilt model and a ledger registers.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from secure_ci.exceptions import PackageError

__all__ = [
    "DIGEST_DOMAIN",
    "MAGIC",
    "MAX_EXITS_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_MANIFEST_BYTES",
    "MAX_PACKAGE_BYTES",
    "MAX_WEIGHTS_BYTES",
    "VERSION",
    "Container",
    "canonical_json",
    "decode_container",
    "encode_container",
    "json_depth",
    "parse_json",
    "scan_depth",
]

MAGIC = b"SCIPKG"
VERSION = 2
DIGEST_DOMAIN = b"secure-ci/model-package/v2"
_DOMAINS = {1: b"secure-ci/model-package/v1", 2: DIGEST_DOMAIN}
MAX_MANIFEST_BYTES = 4 << 20
MAX_WEIGHTS_BYTES = 1 << 30
MAX_EXITS_BYTES = 64 << 20
MAX_JSON_DEPTH = 8
_HEAD = struct.Struct("<6sBBI")
_WEIGHTS_LEN = struct.Struct("<Q")
_DIGEST_LEN = 32
MAX_PACKAGE_BYTES = (
    _HEAD.size + MAX_MANIFEST_BYTES + 2 * _WEIGHTS_LEN.size + MAX_WEIGHTS_BYTES + MAX_EXITS_BYTES
    + _DIGEST_LEN
)  # fmt: skip


@dataclass(frozen=True)
class Container:
    """The sections of a package file whose digest verified (``exits`` is empty in version 1
    files and in packages without exit heads)."""

    manifest: dict[str, Any]
    weights: bytes
    digest: bytes
    exits: bytes = b""
    version: int = VERSION


def canonical_json(value: Any) -> bytes:
    """The one encoding of a manifest."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False)  # fmt: skip
    except (TypeError, ValueError) as exc:
        raise PackageError(f"manifest value cannot be encoded: {exc}") from exc
    return text.encode("ascii")


def _digest(body: bytes | memoryview, version: int = VERSION) -> bytes:
    return hashlib.sha256(_DOMAINS[version] + bytes(body)).digest()


def encode_container(manifest: dict[str, Any], weights: bytes, exits: bytes = b"") -> bytes:
    """The package bytes (current version) for ``manifest``, the safetensors ``weights`` and
    the exit heads (safetensors, or empty)."""
    text = canonical_json(manifest)
    if len(text) > MAX_MANIFEST_BYTES:
        raise PackageError(f"manifest of {len(text)} bytes exceeds {MAX_MANIFEST_BYTES}")
    if len(weights) > MAX_WEIGHTS_BYTES:
        raise PackageError(f"weights of {len(weights)} bytes exceed {MAX_WEIGHTS_BYTES}")
    if len(exits) > MAX_EXITS_BYTES:
        raise PackageError(f"exit heads of {len(exits)} bytes exceed {MAX_EXITS_BYTES}")
    body = b"".join(
        (
            _HEAD.pack(MAGIC, VERSION, 0, len(text)),
            text,
            _WEIGHTS_LEN.pack(len(weights)),
            weights,
            _WEIGHTS_LEN.pack(len(exits)),
            exits,
        )
    )
    return body + _digest(body)


def decode_container(data: bytes) -> Container:
    """Split and verify package bytes; every malformation is a :class:`PackageError`."""
    if not isinstance(data, bytes):
        raise PackageError(f"package must be bytes, not {type(data).__name__}")
    if len(data) > MAX_PACKAGE_BYTES:
        raise PackageError(f"package of {len(data)} bytes exceeds {MAX_PACKAGE_BYTES}")
    if len(data) < _HEAD.size:
        raise PackageError(f"not a model package: only {len(data)} bytes")
    magic, version, flags, manifest_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise PackageError("not a model package (bad magic)")
    if version not in _DOMAINS:
        raise PackageError(f"unsupported model package version {version}")
    if flags != 0:
        raise PackageError(f"unknown package flags 0x{flags:02x}")
    if not 2 <= manifest_len <= MAX_MANIFEST_BYTES:
        raise PackageError(f"manifest length {manifest_len} outside 2..{MAX_MANIFEST_BYTES}")
    at = _HEAD.size + manifest_len
    if len(data) < at + _WEIGHTS_LEN.size:
        raise PackageError("package is truncated inside the manifest")
    (weights_len,) = _WEIGHTS_LEN.unpack_from(data, at)
    if weights_len > MAX_WEIGHTS_BYTES:
        raise PackageError(f"weights length {weights_len} exceeds {MAX_WEIGHTS_BYTES}")
    weights_end = end = at + _WEIGHTS_LEN.size + weights_len
    exits_len = 0
    if version >= 2:
        if len(data) < end + _WEIGHTS_LEN.size:
            raise PackageError("package is truncated inside the weights")
        (exits_len,) = _WEIGHTS_LEN.unpack_from(data, end)
        if exits_len > MAX_EXITS_BYTES:
            raise PackageError(f"exit heads length {exits_len} exceeds {MAX_EXITS_BYTES}")
        end += _WEIGHTS_LEN.size + exits_len
    if len(data) != end + _DIGEST_LEN:
        problem = "truncated" if len(data) < end + _DIGEST_LEN else "followed by extra bytes"
        raise PackageError(f"package is {problem}: {len(data)} bytes, layout needs {end + 32}")
    view = memoryview(data)
    digest = bytes(view[end:])
    if _digest(view[:end], version) != digest:
        raise PackageError("package digest mismatch: the file was modified or corrupted")
    manifest = parse_json(bytes(view[_HEAD.size : at]), "manifest", canonical=True)
    if not isinstance(manifest, dict):
        raise PackageError("manifest must be a JSON object")
    weights = bytes(view[at + _WEIGHTS_LEN.size : weights_end])
    return Container(manifest, weights, digest, bytes(view[end - exits_len : end]), version)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:64]!r}")
        out[key] = value
    return out


def json_depth(value: Any) -> int:
    """Nesting depth of containers (iterative: a hostile value cannot exhaust the stack)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level > MAX_JSON_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def scan_depth(raw: bytes) -> int:
    """Deepest nesting of ``[``/``{`` outside strings, found without parsing (vectorised).

    JSON parsers recurse per level, and a raised recursion limit turns a deep document into a
    crash rather than an error, so the depth is bounded before the parser sees the bytes. A
    quote ends a string unless an odd run of backslashes precedes it; up to the first syntax
    error this is exactly how a JSON parser reads the bytes (UTF-8 continuation bytes never
    look like ASCII punctuation), so the parser never nests deeper than this.
    """
    data = np.frombuffer(raw, dtype=np.uint8)
    if data.size == 0:
        return 0
    index = np.arange(data.size, dtype=np.int64)
    backslash = data == 0x5C
    last_other = np.maximum.accumulate(np.where(backslash, -1, index))
    run = np.zeros(data.size, dtype=np.int64)
    run[1:] = index[:-1] - last_other[:-1]  # backslashes right before each byte
    quote = (data == 0x22) & (run % 2 == 0)
    inside = (np.cumsum(quote) - quote) % 2 == 1
    opening = ((data == 0x5B) | (data == 0x7B)) & ~inside
    closing = ((data == 0x5D) | (data == 0x7D)) & ~inside
    return int(np.cumsum(opening.astype(np.int64) - closing.astype(np.int64)).max())


def parse_json(
    raw: bytes, what: str, *, canonical: bool, max_bytes: int = MAX_MANIFEST_BYTES
) -> Any:
    """Parse bounded JSON: size, depth, duplicate keys, NaN; optionally canonical form."""
    if len(raw) > max_bytes:
        raise PackageError(f"{what} of {len(raw)} bytes exceeds {max_bytes}")
    if scan_depth(raw) > MAX_JSON_DEPTH:
        raise PackageError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_unique, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PackageError(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise PackageError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    if canonical and canonical_json(value) != raw:
        raise PackageError(f"{what} is not canonical JSON")
    return value
