"""The anchorer's epoch state, kept where the host cannot write it.

An epoch starts when the chain lost batches the edge had anchored (see ``_anchor``); the
first batch anchored again carries an *epoch link* (the last head the previous epoch reached
and that epoch's number) in its signed records, which auditors read. The host controls the
journal file, so the epoch and the link live in the edge's sealed store instead (name
``"epoch"``); a library user without one keeps them in memory for the anchorer's lifetime.

It also holds the last batch this enclave anchored and the head the chain returned for it,
written after each anchoring: the chain lost batches exactly when it is behind that batch, and
the link names that head. Neither comes from the journal, whose rows and ``anchored`` flags
the host can rewrite consistently. (A crash between an anchoring and its sealed write leaves
the previous batch sealed: a chain that then loses just that one batch is not linked.)

Sealed blob, exactly 10, 50, 54 or 94 bytes::

    "SCIE" | version u8 (1) | flags u8 (bit 0: link, bit 1: anchored) | epoch u32
           [ | link batch id u64 | previous head 32 | previous epoch u32 ]
           [ | anchored batch id u64 | its head 32 ]

A link is present iff the epoch is not 0, and its previous epoch is ``epoch - 1``. Anything
else (other magic, version, flag bits, length) is refused with :class:`JournalError`.

Sealing authenticates the blob, it does not make it fresh: SGX has no monotonic counter here,
so a host can put back an older sealed file (or delete it, which reads as a fresh edge unless
the journal already has batches). The link is then an older one; records cannot be forged
this way, and an auditor that kept the chain's earlier heads sees an epoch number or head
that does not continue what it saw.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from secure_ci.exceptions import JournalError

__all__ = [
    "EPOCH_SEALED_NAME",
    "AnchoredHead",
    "EpochLink",
    "EpochState",
    "EpochStore",
    "MemoryEpochStore",
    "SealedEpochStore",
]

EPOCH_SEALED_NAME = "epoch"
"""The name of the epoch state in the edge's sealed store."""
_MAGIC = b"SCIE"
_VERSION = 1
_FLAG_LINK = 1
_FLAG_ANCHORED = 2
_HEAD = struct.Struct(">4sBBI")
_LINK = struct.Struct(">Q32sI")
_ANCHORED = struct.Struct(">Q32s")
_U32 = 2**32


@dataclass(frozen=True)
class EpochLink:
    """``batch_id`` carries the link: ``prev_head`` reached in epoch ``prev_epoch``."""

    batch_id: int
    prev_head: bytes
    prev_epoch: int

    def __post_init__(self) -> None:
        if not 0 <= self.batch_id < 2**64 or not 0 <= self.prev_epoch < _U32:
            raise JournalError("epoch link: batch id or epoch out of range")
        if len(self.prev_head) != 32:
            raise JournalError("epoch link: the previous head is not 32 bytes")


@dataclass(frozen=True)
class AnchoredHead:
    """Batch ``batch_id`` is the last this enclave anchored; the chain's head after it."""

    batch_id: int
    head: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.batch_id < 2**64 or len(self.head) != 32:
            raise JournalError("anchored head: batch id out of range or head not 32 bytes")


@dataclass(frozen=True)
class EpochState:
    """The current epoch, the link its first batch carries (None in epoch 0) and the last
    batch anchored (None before the first, or when the chain has none of this edge's)."""

    epoch: int = 0
    link: EpochLink | None = None
    anchored: AnchoredHead | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.epoch < _U32:
            raise JournalError(f"epoch {self.epoch} is out of range")
        if (self.link is None) != (self.epoch == 0):
            raise JournalError("an epoch state has a link iff its epoch is not 0")
        if self.link is not None and self.link.prev_epoch != self.epoch - 1:
            raise JournalError("the epoch link does not name the previous epoch")

    def encode(self) -> bytes:
        flags = (_FLAG_LINK if self.link is not None else 0) | (
            _FLAG_ANCHORED if self.anchored is not None else 0
        )
        out = _HEAD.pack(_MAGIC, _VERSION, flags, self.epoch)
        if self.link is not None:
            out += _LINK.pack(self.link.batch_id, self.link.prev_head, self.link.prev_epoch)
        if self.anchored is not None:
            out += _ANCHORED.pack(self.anchored.batch_id, self.anchored.head)
        return out

    @classmethod
    def decode(cls, data: bytes) -> EpochState:
        """Parse a sealed epoch state; JournalError for anything but the exact format."""
        if not _HEAD.size <= len(data) <= _HEAD.size + _LINK.size + _ANCHORED.size:
            raise JournalError(f"the sealed epoch state has a bad length ({len(data)} bytes)")
        magic, version, flags, epoch = _HEAD.unpack_from(data)
        if magic != _MAGIC:
            raise JournalError("the sealed epoch state has a bad magic")
        if version != _VERSION:
            raise JournalError(f"the sealed epoch state has unknown version {version}")
        if flags & ~(_FLAG_LINK | _FLAG_ANCHORED):
            raise JournalError(f"the sealed epoch state has unknown flags {flags:#x}")
        size = _HEAD.size + (_LINK.size if flags & _FLAG_LINK else 0)
        size += _ANCHORED.size if flags & _FLAG_ANCHORED else 0
        if len(data) != size:
            raise JournalError(
                f"the sealed epoch state has a bad length ({len(data)} bytes, its flags say {size})"
            )
        link = anchored = None
        offset = _HEAD.size
        if flags & _FLAG_LINK:
            link = EpochLink(*_LINK.unpack_from(data, offset))
            offset += _LINK.size
        if flags & _FLAG_ANCHORED:
            anchored = AnchoredHead(*_ANCHORED.unpack_from(data, offset))
        return cls(epoch, link, anchored)


class EpochStore(Protocol):
    """Where an anchorer keeps its epoch state."""

    def load(self) -> EpochState | None:
        """The state, None if it was never saved (raises on anything unreadable)."""
        ...

    def save(self, state: EpochState) -> None:
        """Persist ``state`` durably before returning."""
        ...


class MemoryEpochStore:
    """The state in memory: for an anchorer without sealed storage (it starts, like a sealed
    store that has none yet, from what the journal says was anchored)."""

    def __init__(self) -> None:
        self._state: EpochState | None = None

    def load(self) -> EpochState | None:
        return self._state

    def save(self, state: EpochState) -> None:
        self._state = state


class _NamedBlobs(Protocol):
    """The edge's ``SealedStore`` (``secure_ci.edge``)."""

    def load(self, name: str) -> bytes | None: ...

    def save(self, name: str, data: bytes) -> None: ...


class SealedEpochStore:
    """The state in a sealed store under :data:`EPOCH_SEALED_NAME`."""

    def __init__(self, sealed: _NamedBlobs) -> None:
        self.sealed = sealed

    def load(self) -> EpochState | None:
        data = self.sealed.load(EPOCH_SEALED_NAME)
        return None if data is None else EpochState.decode(data)

    def save(self, state: EpochState) -> None:
        self.sealed.save(EPOCH_SEALED_NAME, state.encode())
