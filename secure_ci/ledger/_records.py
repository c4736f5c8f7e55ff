"""EIP-712 task records: the device's ``TaskRequest`` and the enclave's ``TaskResult``.

Hashing follows EIP-712 directly (every field is a static 32-byte word), so a struct hash is
one keccak over ``typeHash || words`` and needs no ABI machinery on the hot path. Signatures
are 65-byte ``r || s || v`` (v = 27/28, low-s) as OpenZeppelin's ``ECDSA.recover`` expects,
made with libsecp256k1 through coincurve (an edge signs >= 10,000 records/s).
"""

from __future__ import annotations

import functools
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any

import coincurve

from secure_ci.exceptions import RecordError, SignatureError

__all__ = [
    "KeyRegistration",
    "LedgerDomain",
    "Signer",
    "TaskRequest",
    "TaskResult",
    "address_of",
    "commitment",
    "keccak256",
    "new_salt",
    "recover_signer",
    "sign_digest",
    "task_id_for",
]

_local = threading.local()

try:  # pysha3's C keccak: ~0.9 us per short hash (pycryptodome through cffi: ~2.3 us)
    from _pysha3 import keccak_256 as _keccak_256  # type: ignore[import-not-found]

    def keccak256(data: bytes) -> bytes:
        """Keccak-256 (Ethereum's hash, not SHA3-256)."""
        return bytes(_keccak_256(data).digest())

except ImportError:  # pragma: no cover - fall back to pycryptodome's raw keccak via cffi
    from Crypto.Hash.keccak import _raw_keccak_lib as _lib  # type: ignore[attr-defined]
    from Crypto.Util._raw_api import ffi as _ffi

    def _state() -> Any:
        state = getattr(_local, "keccak", None)
        if state is None:
            pointer = _ffi.new("void **")
            if _lib.keccak_init(pointer, 64, 24) != 0:
                raise RecordError("cannot initialise keccak")
            state = (pointer, pointer[0], _ffi.new("uint8_t[32]"))
            _local.keccak = state
        return state

    def keccak256(data: bytes) -> bytes:
        """Keccak-256 (Ethereum's hash, not SHA3-256)."""
        _, raw, out = _state()
        _lib.keccak_reset(raw)
        _lib.keccak_absorb(raw, data, len(data))
        _lib.keccak_digest(raw, out, 32, 1)
        return bytes(_ffi.buffer(out))


_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_ZERO12 = bytes(12)


def _b32(name: str, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise RecordError(f"{name} must be 32 bytes")


def _addr(name: str, value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != 20:
        raise RecordError(f"{name} must be a 20-byte address")


def _uint(name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise RecordError(f"{name} must be a uint{bits}")


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


@dataclass(frozen=True, slots=True)
class LedgerDomain:
    """The EIP-712 domain: name "secure-ci", version "1", chain id and contract address."""

    chain_id: int
    contract: bytes

    def __post_init__(self) -> None:
        _uint("chain_id", self.chain_id, 256)
        _addr("contract", self.contract)

    def separator(self) -> bytes:
        """The EIP-712 domain separator (cached per instance)."""
        cached: bytes | None = _SEPARATORS.get(self)
        if cached is None:
            cached = keccak256(
                _DOMAIN_TYPEHASH
                + keccak256(b"secure-ci")
                + keccak256(b"1")
                + _word(self.chain_id)
                + _ZERO12
                + self.contract
            )
            _SEPARATORS[self] = cached
        return cached


_DOMAIN_TYPEHASH = keccak256(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
_SEPARATORS: dict[LedgerDomain, bytes] = {}
REQUEST_TYPE = (
    "TaskRequest(bytes32 taskId,address device,uint64 deviceSeq,bytes32 modelId,uint16 cut,"
    "bytes32 inputCommitment,address edge,uint64 deadline,bytes32 prevRequest)"
)
RESULT_TYPE = (
    "TaskResult(bytes32 taskId,bytes32 requestHash,bytes32 outputCommitment,bytes32 measurement,"
    "bytes32 quoteId,uint8 status,uint32 latencyMs,uint64 edgeSeq)"
)
KEY_REGISTRATION_TYPE = "KeyRegistration(uint64 partyId,address key,bytes32 detail,uint64 nonce)"
_REQUEST_TYPEHASH = keccak256(REQUEST_TYPE.encode())
_KEY_REGISTRATION_TYPEHASH = keccak256(KEY_REGISTRATION_TYPE.encode())
_RESULT_TYPEHASH = keccak256(RESULT_TYPE.encode())
# ``typeHash || fields`` as 32-byte words in one pack: addresses and uints are left-padded
# (values are range-checked at construction, so uint64 and smaller fit the last 8 bytes)
_REQUEST_WORDS = struct.Struct(">32s32s12x20s24xQ32s24xQ32s12x20s24xQ32s")
_RESULT_WORDS = struct.Struct(">32s32s32s32s32s32s24xQ24xQ24xQ")
# Fixed-width rows of every field in declaration order, for local stores (journal, audit index)
REQUEST_ROW = struct.Struct(">32s20sQ32sH32s20sQ32s")
RESULT_ROW = struct.Struct(">32s32s32s32s32sBIQ")


def _eip712(domain: LedgerDomain, struct_hash: bytes) -> bytes:
    return keccak256(b"\x19\x01" + domain.separator() + struct_hash)


class _TypedRecord:
    """EIP-712 digest, signing and recovery for a record that defines ``struct_hash``.

    For a TaskResult the digest is also the task's ``recordHash`` on the ledger.
    """

    __slots__ = ()

    def struct_hash(self) -> bytes:
        raise NotImplementedError

    def digest(self, domain: LedgerDomain) -> bytes:
        return _eip712(domain, self.struct_hash())

    def sign(self, key: bytes | Signer, domain: LedgerDomain) -> bytes:
        return sign_digest(key, self.digest(domain))

    def recover(self, signature: bytes, domain: LedgerDomain) -> bytes:
        """The address that signed this record (SignatureError if the signature is invalid)."""
        return recover_signer(signature, self.digest(domain))


@dataclass(frozen=True, slots=True)
class TaskRequest(_TypedRecord):
    """What a device asks an edge to run; signed by the device key.

    ``prev_request`` chains a device's requests to one edge: it is the struct hash of the
    device's previous request on the same session (zero for the first). A signature on a
    request therefore covers every earlier request of the chain, which lets a batch's calldata
    carry one device signature per run of chained records instead of one per record.
    """

    task_id: bytes
    device: bytes
    device_seq: int
    model_id: bytes
    cut: int
    input_commitment: bytes
    edge: bytes
    deadline: int
    prev_request: bytes = bytes(32)

    def __post_init__(self) -> None:
        _b32("task_id", self.task_id)
        _addr("device", self.device)
        _uint("device_seq", self.device_seq, 64)
        _b32("model_id", self.model_id)
        _uint("cut", self.cut, 16)
        _b32("input_commitment", self.input_commitment)
        _addr("edge", self.edge)
        _uint("deadline", self.deadline, 64)
        _b32("prev_request", self.prev_request)

    def struct_hash(self) -> bytes:
        """EIP-712 ``hashStruct`` of this request (the result's ``requestHash``)."""
        return keccak256(
            _REQUEST_WORDS.pack(
                _REQUEST_TYPEHASH, self.task_id, self.device, self.device_seq, self.model_id,
                self.cut, self.input_commitment, self.edge, self.deadline, self.prev_request,
            )
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class TaskResult(_TypedRecord):
    """What the enclave returns for a request; signed by the edge's enclave key."""

    task_id: bytes
    request_hash: bytes
    output_commitment: bytes
    measurement: bytes
    quote_id: bytes
    status: int
    latency_ms: int
    edge_seq: int

    def __post_init__(self) -> None:
        _b32("task_id", self.task_id)
        _b32("request_hash", self.request_hash)
        _b32("output_commitment", self.output_commitment)
        _b32("measurement", self.measurement)
        _b32("quote_id", self.quote_id)
        _uint("status", self.status, 8)
        _uint("latency_ms", self.latency_ms, 32)
        _uint("edge_seq", self.edge_seq, 64)

    def struct_hash(self) -> bytes:
        return keccak256(
            _RESULT_WORDS.pack(
                _RESULT_TYPEHASH, self.task_id, self.request_hash, self.output_commitment,
                self.measurement, self.quote_id, self.status, self.latency_ms, self.edge_seq,
            )
        )  # fmt: skip

    def matches(self, request: TaskRequest) -> bool:
        """True when this result answers ``request`` (same task id and request hash)."""
        return self.task_id == request.task_id and self.request_hash == request.struct_hash()


@dataclass(frozen=True, slots=True)
class KeyRegistration(_TypedRecord):
    """A key's proof of possession for its registration, signed by that key.

    ``detail`` is zero for a device and :meth:`edge_detail` for an edge, so an enclave key
    vouches for the measurement, quote id and endpoint it is registered with. ``nonce`` is the
    contract's ``registrationNonce(key)``: each proof registers once, so a published proof
    cannot be replayed (say, to re-activate a revoked edge).
    """

    party_id: int
    key: bytes
    detail: bytes = bytes(32)
    nonce: int = 0

    def __post_init__(self) -> None:
        _uint("party_id", self.party_id, 64)
        _addr("key", self.key)
        _b32("detail", self.detail)
        _uint("nonce", self.nonce, 64)

    @staticmethod
    def edge_detail(measurement: bytes, quote_id: bytes, endpoint: str) -> bytes:
        """``keccak256(abi.encode(measurement, quoteId, keccak256(bytes(endpoint))))``."""
        _b32("measurement", measurement)
        _b32("quote_id", quote_id)
        return keccak256(measurement + quote_id + keccak256(endpoint.encode()))

    def struct_hash(self) -> bytes:
        return keccak256(
            _KEY_REGISTRATION_TYPEHASH
            + _word(self.party_id)
            + _ZERO12
            + self.key
            + self.detail
            + _word(self.nonce)
        )


def task_id_for(device: bytes, input_commitment: bytes) -> bytes:
    """The default task id: ``keccak256(device || inputCommitment)``.

    Commitments are salted afresh per task, so the id is unique; a device that sends one task
    to k edges (same salt, same features) gets the same id at every edge, as disputes need.
    Batch calldata leaves out task ids that equal this value.
    """
    _addr("device", device)
    _b32("input_commitment", input_commitment)
    return keccak256(device + input_commitment)


def commitment(salt: bytes, data: bytes) -> bytes:
    """Salted commitment ``keccak256(salt32 || data)``; the salt stays off chain."""
    _b32("salt", salt)
    return keccak256(salt + data)


def new_salt() -> bytes:
    """32 fresh random bytes for :func:`commitment`."""
    return os.urandom(32)


class Signer:
    """A parsed secp256k1 signing key. Parsing costs ~100 us, so hot paths keep one."""

    __slots__ = ("_private", "address")

    def __init__(self, key: bytes) -> None:
        try:
            self._private = coincurve.PrivateKey(key)
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"invalid private key: {exc}") from exc
        public = self._private.public_key.format(compressed=False)
        self.address: bytes = keccak256(public[1:])[12:]

    def sign(self, digest: bytes) -> bytes:
        """Sign a 32-byte digest: ``r || s || v`` with v in {27, 28} and low s."""
        raw = self._private.sign_recoverable(digest, hasher=None)
        return raw[:64] + bytes((raw[64] + 27,))


def address_of(key: bytes) -> bytes:
    """The 20-byte Ethereum address of a 32-byte secp256k1 private key."""
    return Signer(key).address


@functools.lru_cache(maxsize=16)
def _signer(key: bytes) -> Signer:
    return Signer(key)


def sign_digest(key: bytes | Signer, digest: bytes) -> bytes:
    """Sign a 32-byte digest with a raw key or a :class:`Signer`.

    Raw keys are parsed once (a few recently used ones are kept), so callers that sign every
    record with the same key pay the ~100 us key parsing once.
    """
    return (key if isinstance(key, Signer) else _signer(bytes(key))).sign(digest)


def recover_signer(signature: bytes, digest: bytes) -> bytes:
    """The address behind a 65-byte signature, with OpenZeppelin's rules (low s, v 27/28)."""
    if not isinstance(signature, bytes) or len(signature) != 65:
        raise SignatureError("signature must be 65 bytes")
    v = signature[64]
    s = int.from_bytes(signature[32:64], "big")
    if v not in (27, 28) or s > _SECP256K1_N // 2:
        raise SignatureError("signature is malleable or has a bad v")
    try:
        public = coincurve.PublicKey.from_signature_and_message(
            signature[:64] + bytes((v - 27,)), digest, hasher=None
        )
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"signature does not recover: {exc}") from exc
    return keccak256(public.format(compressed=False)[1:])[12:]
