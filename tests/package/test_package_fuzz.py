"""Mutation fuzzing of the loader: every damaged package is a PackageError, nothing else.

Raw damage (flipped, truncated or appended bytes) must fail the container checks. Damage an
attacker reseals (a recomputed digest around a changed manifest or changed weights) must
either fail validation with a PackageError or still describe the very same model.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from package_helpers import (
    digits_package,
    exit_section,
    reseal,
    sections,
    with_exits,
    with_weights,
)

from secure_ci.exceptions import PackageError
from secure_ci.package import ModelPackage, read_package

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([10**400, -1, 0, 2**63, 2**64])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out.extend(_paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value[:3]):  # enough of each list to reach every shape
            out.extend(_paths(child, (*prefix, index)))
    return out


@functools.cache
def _original() -> ModelPackage:
    return read_package(digits_package())


def _loads_or_refuses(data: bytes) -> None:
    """The loader's contract: a verified package of the original model, or a PackageError."""
    original = _original()
    try:
        package = read_package(data)
    except PackageError:
        return
    assert package.model_id == original.model_id
    assert package.cuts == original.cuts
    for cut in package.exit_cuts:  # whatever loads has usable exit heads
        head = package.exit_head(cut)
        assert all(bool(torch.isfinite(p).all()) for p in head.parameters())


@given(st.data())
def test_flipped_bytes_are_refused(data: st.DataObject) -> None:
    raw = bytearray(digits_package())
    for position in data.draw(st.sets(st.integers(0, len(raw) - 1), min_size=1, max_size=3)):
        raw[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(PackageError):
        read_package(bytes(raw))


@given(st.integers(min_value=0), st.binary(min_size=1, max_size=64))
def test_truncated_or_extended_packages_are_refused(cut: int, extra: bytes) -> None:
    raw = digits_package()
    with pytest.raises(PackageError):
        read_package(raw[: cut % len(raw)])
    with pytest.raises(PackageError, match="extra bytes"):
        read_package(raw + extra)


@given(st.data())
def test_resealed_manifest_mutations(data: st.DataObject) -> None:
    manifest, weights = sections(digits_package())
    mutated = copy.deepcopy(manifest)
    path = data.draw(st.sampled_from(_paths(manifest)[1:]))
    parent = mutated
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = data.draw(JSON_VALUES)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=6))] = data.draw(JSON_VALUES)
    else:
        parent.append(data.draw(JSON_VALUES))
    _loads_or_refuses(reseal(mutated, weights))


def _mutate(manifest: dict[str, Any], data: st.DataObject, paths: list[tuple[Any, ...]]) -> None:
    path = data.draw(st.sampled_from(paths))
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = data.draw(JSON_VALUES)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=6))] = data.draw(JSON_VALUES)
    else:
        parent.append(data.draw(JSON_VALUES))


@given(st.data())
def test_resealed_exit_table_mutations(data: st.DataObject) -> None:
    """Mutations aimed at the exits table (the generic test rarely draws its deep paths)."""
    manifest, weights = sections(digits_package())
    mutated = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 2))):
        paths = [p for p in _paths(mutated) if p[:1] == ("exits",)]
        if not paths:
            break
        _mutate(mutated, data, paths)
    _loads_or_refuses(reseal(mutated, weights, exit_section(digits_package())))


@settings(max_examples=30)  # most data flips load: each example rebuilds the model
@given(st.data())
def test_resealed_exit_section_mutations(data: st.DataObject) -> None:
    raw = bytearray(exit_section(digits_package()))
    header_end = 8 + int.from_bytes(raw[:8], "little")
    region = data.draw(st.sampled_from(["length", "header", "data"]))
    low, high = {
        "length": (0, 7),
        "header": (8, header_end - 1),
        "data": (header_end, len(raw) - 1),
    }[region]
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(low, high))] ^= data.draw(st.integers(1, 255))
    _loads_or_refuses(with_exits(digits_package(), bytes(raw)))


@given(st.data())
def test_resealed_weight_mutations(data: st.DataObject) -> None:
    _, weights = sections(digits_package())
    raw = bytearray(weights)
    header_end = 8 + int.from_bytes(raw[:8], "little")
    region = data.draw(st.sampled_from(["length", "header", "data"]))
    low, high = {
        "length": (0, 7),
        "header": (8, header_end - 1),
        "data": (header_end, len(raw) - 1),
    }[region]
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(low, high))] ^= data.draw(st.integers(1, 255))
    _loads_or_refuses(with_weights(digits_package(), bytes(raw)))


def test_changed_weight_values_change_the_model_id() -> None:
    _, weights = sections(digits_package())
    raw = bytearray(weights)
    raw[-1] ^= 0x01  # the last byte of the last tensor's data
    with pytest.raises(PackageError, match="model_id mismatch"):
        read_package(with_weights(digits_package(), bytes(raw)))
