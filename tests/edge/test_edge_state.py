"""The edge's sealed state: keys survive a restart, nobody else can read or change them, and
one state directory runs one edge."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_ci.edge._identity import create_identity, measurement_of, recover_identity
from secure_ci.edge._state import (
    DevSealedStore,
    PlainSealedStore,
    SealedKeys,
    StateLock,
    write_atomic,
)
from secure_ci.exceptions import ConfigError, SecureCIError
from secure_ci.testing import DEV_MRENCLAVE, DEV_NOW, dev_enclave

OTHER = bytes(range(32))


def test_a_restarted_edge_recovers_its_identity(tmp_path: Path) -> None:
    provider = dev_enclave(DEV_NOW).provider
    store = DevSealedStore(tmp_path / "sealed", measurement_of(provider))
    first, recovered = recover_identity(provider, store, now=DEV_NOW)
    assert not recovered
    again, recovered = recover_identity(provider, store, now=DEV_NOW + 60)
    assert recovered
    assert (again.address, again.spki_der, again.quote_id, again.measurement) == (
        first.address, first.spki_der, first.quote_id, first.measurement,
    )  # fmt: skip
    assert create_identity(provider, now=DEV_NOW).address != first.address  # fresh otherwise


def test_the_host_reads_no_key_and_changes_none(tmp_path: Path) -> None:
    provider = dev_enclave(DEV_NOW).provider
    store = DevSealedStore(tmp_path, DEV_MRENCLAVE)
    identity, _ = recover_identity(provider, store, now=DEV_NOW)
    sealed = (tmp_path / SealedKeys.NAME).read_bytes()
    assert identity.signing_key not in sealed
    assert (tmp_path / SealedKeys.NAME).stat().st_mode & 0o077 == 0
    for offset in (0, 20, len(sealed) // 2, len(sealed) - 1):
        changed = bytearray(sealed)
        changed[offset] ^= 1
        (tmp_path / SealedKeys.NAME).write_bytes(bytes(changed))
        with pytest.raises(SecureCIError, match=r"does not unseal|not a sealed blob"):
            SealedKeys.load(store)
    (tmp_path / SealedKeys.NAME).write_bytes(sealed[:-1])
    with pytest.raises(SecureCIError):
        SealedKeys.load(store)


def test_another_measurement_cannot_unseal(tmp_path: Path) -> None:
    provider = dev_enclave(DEV_NOW).provider
    recover_identity(provider, DevSealedStore(tmp_path, DEV_MRENCLAVE), now=DEV_NOW)
    with pytest.raises(SecureCIError, match="another measurement"):
        SealedKeys.load(DevSealedStore(tmp_path, OTHER))


def test_a_sealed_blob_is_bound_to_its_name(tmp_path: Path) -> None:
    store = DevSealedStore(tmp_path, DEV_MRENCLAVE)
    store.save("a", b"secret")
    (tmp_path / "b").write_bytes((tmp_path / "a").read_bytes())
    assert store.load("a") == b"secret"
    with pytest.raises(SecureCIError):
        store.load("b")
    assert store.load("missing") is None


def test_plain_store_is_what_gramine_encrypts(tmp_path: Path) -> None:
    store = PlainSealedStore(tmp_path / "sealed")
    assert store.load("x") is None
    store.save("x", b"keys")
    assert store.load("x") == b"keys"
    (tmp_path / "sealed" / "big").write_bytes(bytes(1 << 20))
    with pytest.raises(SecureCIError, match="larger"):
        store.load("big")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_malformed_sealed_keys_are_refused(data: bytes) -> None:
    try:
        keys = SealedKeys.decode(data)
    except SecureCIError:
        return
    assert SealedKeys.decode(keys.encode()) == keys  # only well-formed keys decode


def test_one_edge_per_state_directory(tmp_path: Path) -> None:
    with (
        StateLock(tmp_path),
        pytest.raises(ConfigError, match="another edge"),
        StateLock(tmp_path),
    ):
        pass
    with StateLock(tmp_path):  # released: usable again
        pass


def test_write_atomic_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_atomic(path, b"one")
    write_atomic(path, b"two", 0o644)
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
