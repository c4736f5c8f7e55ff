"""The edge's persistent state: its keys sealed to the enclave, and one edge per state directory.

An edge must keep its identity across restarts: its enclave key signed every record in its
journal and is registered on the ledger, so a restarted edge (same measurement) that made a
new key could neither anchor what it acknowledged before nor keep its chain position.

Where the keys live (``sealed_dir``):

- **Gramine**: a directory the manifest mounts as encrypted files with
  ``key_name = "_sgx_mrenclave"`` (``enclave/secure-ci-edge.manifest.template``). Gramine
  encrypts and authenticates every byte with a key only an enclave of the same measurement can
  derive; the host sees ciphertext. :class:`PlainSealedStore` reads and writes it as plain files.
- **Simulated**: :class:`DevSealedStore` emulates the same policy: AES-256-GCM under
  ``HKDF(platform secret, measurement)``, where the platform secret is a random file standing in
  for the CPU's fused key. Another measurement cannot unseal (it derives another key), and a
  changed byte fails authentication. It protects nothing against the host, who can read the
  platform secret: it exists so that the simulated edge behaves like the real one.

The sealed identity is ``b"SCIK" || version (1) || signing key (32) || TLS key (PKCS#8 DER)``.
A missing file means a new edge; a file that does not unseal is an error, never silently
replaced (that would orphan the journal): the operator moves it away on purpose. The same
store keeps the anchorer's epoch state (name ``"epoch"``, see ``secure_ci.ledger._epoch``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from secure_ci.exceptions import ConfigError, SecureCIError

__all__ = [
    "DevSealedStore",
    "PlainSealedStore",
    "SealedKeys",
    "SealedStore",
    "StateLock",
    "write_atomic",
]

_MAGIC = b"SCIK"
_VERSION = 1
_SEAL_MAGIC = b"SCI-DEVSEAL-1"
_MAX_SEALED = 16 * 1024
_PLATFORM_SECRET = "dev-platform-secret"  # noqa: S105 - a file name


class SealedStore(Protocol):
    """Named blobs only the enclave (of this measurement) can read back."""

    def load(self, name: str) -> bytes | None:
        """The blob, None if it was never written; raises SecureCIError if it does not unseal."""
        ...

    def save(self, name: str, data: bytes) -> None: ...


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``path`` so that a reader sees the old content or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself is durable once the dir is synced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read_bounded(path: Path) -> bytes | None:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_SEALED + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read sealed state {path}: {exc.strerror or exc}") from exc
    if len(data) > _MAX_SEALED:
        raise SecureCIError(f"sealed state {path} is larger than {_MAX_SEALED} bytes")
    return data


@dataclass(frozen=True)
class PlainSealedStore:
    """Plain files in a directory that Gramine mounts as encrypted files (it seals them)."""

    directory: Path

    def load(self, name: str) -> bytes | None:
        return _read_bounded(self.directory / name)

    def save(self, name: str, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.directory / name, data)


@dataclass(frozen=True)
class DevSealedStore:
    """Development sealing: AES-GCM keyed by a platform secret and the measurement."""

    directory: Path
    measurement: bytes
    random_bytes: Callable[[int], bytes] = field(default=os.urandom, repr=False)

    def _key(self) -> bytes:
        path = self.directory / _PLATFORM_SECRET
        secret = _read_bounded(path)
        if secret is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            secret = self.random_bytes(32)
            try:  # create-only: two edges racing here must not get two secrets
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return self._key()
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
                f.flush()
                os.fsync(f.fileno())
        if len(secret) != 32:
            raise SecureCIError(f"the development platform secret {path} is not 32 bytes")
        kdf = HKDF(hashes.SHA256(), 32, salt=_SEAL_MAGIC, info=self.measurement)
        return kdf.derive(secret)

    def _aad(self, name: str) -> bytes:
        return _SEAL_MAGIC + name.encode() + self.measurement

    def load(self, name: str) -> bytes | None:
        blob = _read_bounded(self.directory / name)
        if blob is None:
            return None
        if len(blob) < len(_SEAL_MAGIC) + 12 + 16 or not blob.startswith(_SEAL_MAGIC):
            raise SecureCIError(f"sealed file {self.directory / name} is not a sealed blob")
        nonce = blob[len(_SEAL_MAGIC) : len(_SEAL_MAGIC) + 12]
        try:
            return AESGCM(self._key()).decrypt(
                nonce, blob[len(_SEAL_MAGIC) + 12 :], self._aad(name)
            )
        except InvalidTag:
            raise SecureCIError(
                f"sealed file {self.directory / name} does not unseal: it was changed, or sealed "
                "by an enclave of another measurement"
            ) from None

    def save(self, name: str, data: bytes) -> None:
        nonce = self.random_bytes(12)
        sealed = AESGCM(self._key()).encrypt(nonce, data, self._aad(name))
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.directory / name, _SEAL_MAGIC + nonce + sealed)


@dataclass(frozen=True)
class SealedKeys:
    """The keys an edge keeps: its secp256k1 enclave key and its RA-TLS key."""

    signing_key: bytes = field(repr=False)
    tls_key: ec.EllipticCurvePrivateKey = field(repr=False)

    NAME = "identity"

    def encode(self) -> bytes:
        der = self.tls_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return _MAGIC + bytes([_VERSION]) + self.signing_key + der

    @classmethod
    def decode(cls, data: bytes) -> SealedKeys:
        if len(data) < 5 + 32 + 16 or data[:4] != _MAGIC:
            raise SecureCIError("the sealed identity is malformed")
        if data[4] != _VERSION:
            raise SecureCIError(f"the sealed identity has unknown version {data[4]}")
        try:
            key = serialization.load_der_private_key(data[37:], password=None)
        except (ValueError, TypeError) as exc:
            raise SecureCIError(f"the sealed TLS key is malformed: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SecureCIError("the sealed TLS key is not an EC key")
        return cls(data[5:37], key)

    @classmethod
    def load(cls, store: SealedStore) -> SealedKeys | None:
        data = store.load(cls.NAME)
        return None if data is None else cls.decode(data)

    def save(self, store: SealedStore) -> None:
        store.save(self.NAME, self.encode())


class StateLock:
    """An exclusive lock on a state directory: one edge per directory, refused otherwise."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "edge.lock"
        self._fd: int | None = None

    def __enter__(self) -> StateLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot use state directory {self.path.parent}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"another edge (pid {holder}) is running on state directory "
                f"{self.path.parent}: stop it first, or give this edge its own state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
