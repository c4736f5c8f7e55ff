"""The sealed epoch state: exact format, strict parser, stores."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.edge._state import DevSealedStore, PlainSealedStore
from secure_ci.exceptions import JournalError, SecureCIError
from secure_ci.ledger import (
    EpochLink,
    EpochState,
    MemoryEpochStore,
    SealedEpochStore,
)
from secure_ci.ledger._epoch import EPOCH_SEALED_NAME, AnchoredHead


@st.composite
def states(draw: st.DrawFn) -> EpochState:
    epoch = draw(st.integers(0, 2**32 - 1))
    anchored = draw(
        st.none()
        | st.builds(AnchoredHead, st.integers(0, 2**64 - 1), st.binary(min_size=32, max_size=32))
    )
    if epoch == 0:
        return EpochState(anchored=anchored)
    link = EpochLink(
        draw(st.integers(0, 2**64 - 1)), draw(st.binary(min_size=32, max_size=32)), epoch - 1
    )
    return EpochState(epoch, link, anchored)


def _decodes_or_refuses(data: bytes) -> None:
    """A blob is either refused with JournalError or a valid state that encodes back to it."""
    try:
        state = EpochState.decode(data)
    except JournalError:
        return
    assert state.encode() == data
    assert (state.link is None) == (state.epoch == 0)


@given(states())
def test_round_trip(state: EpochState) -> None:
    data = state.encode()
    assert len(data) == 10 + 44 * (state.link is not None) + 40 * (state.anchored is not None)
    assert EpochState.decode(data) == state


@given(states(), st.data())
def test_every_truncation_extension_and_bit_flip(state: EpochState, data: st.DataObject) -> None:
    blob = state.encode()
    for n in range(len(blob)):
        with pytest.raises(JournalError):
            EpochState.decode(blob[:n])
    extra = data.draw(st.binary(min_size=1, max_size=64))
    with pytest.raises(JournalError):
        EpochState.decode(blob + extra)
    for bit in range(len(blob) * 8):
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        _decodes_or_refuses(bytes(flipped))


@given(st.binary(max_size=80))
def test_arbitrary_bytes(data: bytes) -> None:
    _decodes_or_refuses(data)


def test_framing_errors_are_specific() -> None:
    good = EpochState(3, EpochLink(7, b"\x01" * 32, 2)).encode()
    cases = {
        b"": "length",
        good + b"\x00": "length",
        b"\x00" * (1 << 20): "length",  # oversized
        b"XCIE" + good[4:]: "magic",
        good[:4] + b"\x02" + good[5:]: "version",
        good[:5] + b"\x05" + good[6:]: "flags",
        good[:5] + b"\x00" + good[6:]: "flags say 10",
        good[:5] + b"\x03" + good[6:]: "flags say 94",
        EpochState().encode()[:5] + b"\x01" + EpochState().encode()[6:]: "flags say 54",
        good[:6] + (0).to_bytes(4, "big") + good[10:]: "iff",  # epoch 0 with a link
        good[:-4] + (1).to_bytes(4, "big"): "previous epoch",
        EpochState().encode()[:6] + (1).to_bytes(4, "big"): "iff",  # epoch 1, no link
    }
    for blob, message in cases.items():
        with pytest.raises(JournalError, match=message):
            EpochState.decode(blob)


def test_states_are_validated() -> None:
    link = EpochLink(0, bytes(32), 0)
    for bad in (
        lambda: EpochState(0, link),
        lambda: EpochState(1),
        lambda: EpochState(2, link),
        lambda: EpochState(2**32, EpochLink(0, bytes(32), 2**32 - 1)),
        lambda: EpochLink(2**64, bytes(32), 0),
        lambda: EpochLink(0, bytes(31), 0),
        lambda: EpochLink(0, bytes(32), -1),
        lambda: AnchoredHead(-1, bytes(32)),
        lambda: AnchoredHead(0, bytes(33)),
    ):
        with pytest.raises(JournalError):
            bad()


def test_stores(tmp_path: Path) -> None:
    memory = MemoryEpochStore()
    assert memory.load() is None  # like a sealed store that has none yet
    state = EpochState(1, EpochLink(4, b"\x05" * 32, 0), AnchoredHead(3, b"\x06" * 32))
    memory.save(state)
    assert memory.load() == state
    sealed = SealedEpochStore(DevSealedStore(tmp_path / "dev", b"\x11" * 32))
    assert sealed.load() is None
    sealed.save(state)
    assert sealed.load() == state
    assert state.encode() not in (tmp_path / "dev" / EPOCH_SEALED_NAME).read_bytes()
    (tmp_path / "dev" / EPOCH_SEALED_NAME).write_bytes(b"garbage" * 10)
    with pytest.raises(SecureCIError):
        sealed.load()
    plain = SealedEpochStore(PlainSealedStore(tmp_path / "plain"))
    plain.save(state)
    assert plain.load() == state
    (tmp_path / "plain" / EPOCH_SEALED_NAME).write_bytes(b"garbage")
    with pytest.raises(JournalError):
        plain.load()
