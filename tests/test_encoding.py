from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_ci._encoding import canonical_cbor, decode_cbor, digest
from secure_ci.exceptions import SecureCIError

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(values)
def test_canonical_round_trip(value: object) -> None:
    assert decode_cbor(canonical_cbor(value)) == value


@given(st.binary(max_size=200))
def test_decoder_rejects_garbage_with_our_error(data: bytes) -> None:
    with contextlib.suppress(SecureCIError):
        decode_cbor(data)


def test_map_key_order_does_not_matter_and_domains_separate() -> None:
    assert canonical_cbor({"b": 1, "a": 2}) == canonical_cbor({"a": 2, "b": 1})
    assert digest("x", {"a": 1}) != digest("y", {"a": 1})


def test_non_canonical_and_oversized_are_refused() -> None:
    with pytest.raises(SecureCIError, match="canonical"):
        decode_cbor(bytes([0x18, 0x01]))  # 1 encoded in two bytes
    with pytest.raises(SecureCIError, match="exceeds"):
        decode_cbor(b"\x00" * 10, max_bytes=4)
