"""Render and validate the Gramine manifest of the edge service.

The template (``enclave/secure-ci-edge.manifest.template``) uses ``{{ name }}`` placeholders.
They are substituted here without Jinja: every placeholder must have a value, every value
must be plain (no quotes, backslashes or newlines, so it cannot inject TOML), and the result
must parse with :mod:`tomllib` and carry the keys a production enclave needs.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from typing import Any

from secure_ci.exceptions import ConfigError

__all__ = ["REQUIRED_MANIFEST_KEYS", "render_manifest", "validate_manifest"]

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_./:+=@,-]*")

REQUIRED_MANIFEST_KEYS = (
    "libos.entrypoint",
    "loader.entrypoint.uri",
    "loader.argv",
    "fs.mounts",
    "sgx.enclave_size",
    "sgx.max_threads",
    "sgx.remote_attestation",
    "sgx.trusted_files",
    "sgx.debug",
)


def render_manifest(template: str, values: Mapping[str, object]) -> str:
    """Substitute ``values`` into ``template`` and validate the result."""
    missing = sorted({m for m in _PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise ConfigError(f"manifest values missing: {', '.join(missing)}")

    def substitute(match: re.Match[str]) -> str:
        value = values[match.group(1)]
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if not _SAFE_VALUE.fullmatch(text):
            raise ConfigError(f"manifest value for {match.group(1)!r} has unsafe characters")
        return text

    rendered = _PLACEHOLDER.sub(substitute, template)
    validate_manifest(rendered)
    return rendered


def _lookup(table: Mapping[str, Any], dotted: str) -> object:
    node: object = table
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"manifest lacks {dotted}")
        node = node[part]
    return node


SEALED_PATH = "/sealed"
"""Where the enclave keeps its keys: ``sealed_dir`` in the edge's configuration."""


def _check_sealed_mount(mounts: list[dict[str, Any]]) -> None:
    """The sealed directory must be an encrypted mount keyed to MRENCLAVE: a key sealed only
    to MRSIGNER would open for every enclave the signer ever signs, a host-provided key for
    the host."""
    sealed = [m for m in mounts if m.get("path") == SEALED_PATH]
    if len(sealed) != 1:
        raise ConfigError(f"fs.mounts must mount {SEALED_PATH} once (the sealed keys)")
    mount = sealed[0]
    if mount.get("type") != "encrypted" or mount.get("key_name") != "_sgx_mrenclave":
        raise ConfigError(
            f'{SEALED_PATH} must be {{ type = "encrypted", key_name = "_sgx_mrenclave" }}'
        )
    uri = mount.get("uri")
    if not isinstance(uri, str) or not uri.startswith("file:"):
        raise ConfigError(f"the {SEALED_PATH} mount needs a file: uri")


def validate_manifest(text: str) -> dict[str, Any]:
    """Parse a rendered manifest and check what a production edge enclave must have."""
    if "{{" in text or "{%" in text:
        raise ConfigError("manifest still contains template syntax")
    try:
        manifest = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"manifest is not valid TOML: {exc}") from exc
    for key in REQUIRED_MANIFEST_KEYS:
        _lookup(manifest, key)
    if _lookup(manifest, "sgx.remote_attestation") != "dcap":
        raise ConfigError('sgx.remote_attestation must be "dcap" for RA-TLS')
    if _lookup(manifest, "sgx.debug") is not False:
        raise ConfigError("sgx.debug must be false: debug enclaves are refused by devices")
    size = _lookup(manifest, "sgx.enclave_size")
    if not isinstance(size, str) or not re.fullmatch(r"[1-9][0-9]*[MG]", size):
        raise ConfigError(f"sgx.enclave_size must look like '4G', not {size!r}")
    threads = _lookup(manifest, "sgx.max_threads")
    if not isinstance(threads, int) or isinstance(threads, bool) or not 4 <= threads <= 1024:
        raise ConfigError(f"sgx.max_threads must be an integer in 4..1024, not {threads!r}")
    trusted = _lookup(manifest, "sgx.trusted_files")
    if not isinstance(trusted, list) or not trusted:
        raise ConfigError("sgx.trusted_files must be a non-empty list")
    for entry in trusted:
        if not isinstance(entry, str) or not entry.startswith("file:"):
            raise ConfigError(f"trusted file {entry!r} must be a file: URI")
    mounts = _lookup(manifest, "fs.mounts")
    if not isinstance(mounts, list) or not all(
        isinstance(m, dict) and isinstance(m.get("path"), str) for m in mounts
    ):
        raise ConfigError("fs.mounts must be a list of tables with a path")
    _check_sealed_mount(mounts)
    argv = _lookup(manifest, "loader.argv")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ConfigError("loader.argv must be a list of strings")
    return manifest
