"""The canonical output rule: strict parsing in the manifest, the default packing picks, and
the canonical bytes themselves (what honest edges must agree on for a dispute)."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from package_helpers import reseal, sections

import secure_ci.partition._canonical as canonical_module
from secure_ci.exceptions import CodecError, PackageError
from secure_ci.package import read_package
from secure_ci.partition import (
    DEFAULT_CANONICAL,
    CanonicalRule,
    canonical_bytes,
    default_canonical,
    encode_features,
    parse_canonical,
)
from secure_ci.testing._digits import digits_package

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@pytest.mark.parametrize(
    "value",
    [
        None,
        [],
        "topk",
        {},
        {"kind": "topk"},
        {"kind": "topk", "k": 0},
        {"kind": "topk", "k": -1},
        {"kind": "topk", "k": 65536},
        {"kind": "topk", "k": True},
        {"kind": "topk", "k": 1.0},
        {"kind": "topk", "k": "1"},
        {"kind": "topk", "k": 1, "step": 0.5},
        {"kind": "quantize", "step": 0},
        {"kind": "quantize", "step": -0.5},
        {"kind": "quantize", "step": math.nan},
        {"kind": "quantize", "step": math.inf},
        {"kind": "quantize", "step": 2.0**-65},
        {"kind": "quantize", "step": 2.0**65},
        {"kind": "quantize", "step": 10**400},
        {"kind": "quantize", "step": False},
        {"kind": "quantize", "step": "0.5"},
        {"kind": "quantize", "step": 0.5, "k": 1},
        {"kind": "argmax", "k": 1},
        {"kind": ["topk"], "k": 1},
    ],
)
def test_hostile_rules_are_package_errors(value: object) -> None:
    with pytest.raises(PackageError):
        CanonicalRule.from_json(value)


@given(JSON)
def test_from_json_raises_only_package_errors_and_round_trips(value: object) -> None:
    try:
        rule = CanonicalRule.from_json(value)
    except PackageError:
        return
    assert CanonicalRule.from_json(rule.to_json()) == rule
    assert rule.kind in ("topk", "quantize")


@given(st.integers(1, 0xFFFF) | st.floats(2.0**-64, 2.0**64))
def test_valid_rules_round_trip(value: int | float) -> None:
    if isinstance(value, int):
        rule = CanonicalRule.from_json({"kind": "topk", "k": value})
        assert parse_canonical(f"topk:{value}") == rule
    else:
        rule = CanonicalRule.from_json({"kind": "quantize", "step": value})
        assert parse_canonical(f"quantize:{value!r}") == rule
    assert CanonicalRule.from_json(rule.to_json()) == rule


@pytest.mark.parametrize("text", ["", "topk", "topk:", "topk:x", "topk:0", "quantize:nan", "q:1"])
def test_command_line_rules_are_checked(text: str) -> None:
    with pytest.raises(PackageError):
        parse_canonical(text)


def test_the_manifest_carries_the_rule_strictly() -> None:
    manifest, weights = sections(digits_package())
    assert manifest["canonical"] == {"kind": "topk", "k": 1}  # packing's default: a classifier
    assert read_package(digits_package()).canonical == DEFAULT_CANONICAL
    quantized = {**manifest, "canonical": {"kind": "quantize", "step": 0.25}}
    package = read_package(reseal(quantized, weights))
    assert package.canonical == CanonicalRule("quantize", step=0.25)
    assert package.describe()["canonical"] == {"kind": "quantize", "step": 0.25}
    without = {k: v for k, v in manifest.items() if k != "canonical"}
    package = read_package(reseal(without, weights))
    assert package.manifest.canonical is None
    assert package.canonical == DEFAULT_CANONICAL  # the documented default
    for hostile in [None, {"kind": "topk", "k": 0}, {"kind": "quantize", "step": -1.0}, []]:
        with pytest.raises(PackageError, match="canonical"):
            read_package(reseal({**manifest, "canonical": hostile}, weights))


def test_packing_picks_topk_for_classifiers_and_quantize_otherwise() -> None:
    assert default_canonical([(1, 10)]) == DEFAULT_CANONICAL
    step = canonical_module.DEFAULT_QUANTIZE_STEP
    for shapes in [[(1, 1)], [(1, 4, 4)], [(1, 10), (1, 10)], [(10,)], []]:
        assert default_canonical(shapes) == CanonicalRule("quantize", step=step)


def _reference_topk(row: list[float], k: int) -> list[int]:
    key = [(-x if not math.isnan(x) else math.inf, i) for i, x in enumerate(row)]
    return [i for _, i in sorted(key)[:k]]


ROWS = st.lists(
    st.one_of(
        st.sampled_from([0.0, -0.0, 1.0, math.nan, math.inf, -math.inf]),
        st.floats(-1e6, 1e6, width=32),
    ),
    min_size=1,
    max_size=12,
)


@given(st.lists(ROWS, min_size=1, max_size=4), st.integers(1, 16))
def test_topk_is_the_k_largest_ties_by_lowest_index(rows: list[list[float]], k: int) -> None:
    width = len(rows[0])
    array = np.array([(r * width)[:width] for r in rows], dtype=np.float32)
    rule = CanonicalRule("topk", k=k)
    encoded = rule.encode([array])
    head = b"T" + struct.pack(">HBB2I", k, 1, 2, *array.shape)
    expected = [i for r in array.tolist() for i in _reference_topk(r, k)]
    assert encoded == head + struct.pack(f">{len(expected)}I", *expected)
    small, canonical_module._SMALL = canonical_module._SMALL, -1  # force the numpy path
    try:
        assert rule.encode([array]) == encoded
    finally:
        canonical_module._SMALL = small


@given(ROWS, st.sampled_from([2.0**-6, 0.1, 1.0, 1000.0]))
def test_quantize_rounds_half_to_even_clamps_and_marks_nan(row: list[float], step: float) -> None:
    array = np.array(row, dtype=np.float32)
    encoded = CanonicalRule("quantize", step=step).encode([array])
    values = struct.unpack(f">{len(row)}i", encoded[-4 * len(row) :])
    for x, q in zip(array.tolist(), values, strict=True):
        if math.isnan(x):
            assert q == -(2**31)
        elif math.isinf(x) or abs(x / step) >= 2**31:
            assert q == (2**31 - 1 if x > 0 else -(2**31) + 1)
        else:
            assert q == round(x / step)  # Python's round is half to even too


def test_canonical_bytes_are_a_function_of_the_decoded_payload() -> None:
    """Every codec's payload of the same logits gives the same top-1 bytes; the bytes name the
    rule, the tensors and their shapes; a payload that does not decode is a CodecError."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    expected = b"T" + struct.pack(">HBB2II", 1, 1, 2, 1, 4, 1)
    for codec in ("float32", "float16", "int8", "float32+zstd"):
        payload = encode_features([logits], codec)
        assert canonical_bytes(DEFAULT_CANONICAL, payload) == expected
    two = encode_features([logits, logits[:, :2]], "float32")
    assert canonical_bytes(CanonicalRule("topk", k=9), two).startswith(b"T\x00\x09\x02")
    with pytest.raises(CodecError):
        canonical_bytes(DEFAULT_CANONICAL, b"not features")


def test_topk_survives_the_noise_of_another_batch_size() -> None:
    """The digits tail run on one sample and inside a batch of eight: outputs differ in the
    last bits, top-1 does not (quantize can flip at a rounding boundary: see the docs)."""
    from secure_ci.package import read_package as read

    partitioner = read(digits_package()).partitioner()
    _, tail = partitioner.split(2)
    head, _ = partitioner.split(2)
    xs = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = head(xs)
        features = out if isinstance(out, tuple) else (out,)
        batched = tail(*features)
        alone = torch.cat([tail(*(f[i : i + 1] for f in features)) for i in range(8)])
    for i in range(8):
        pair: list[Any] = [batched[i : i + 1], alone[i : i + 1]]
        codes = [canonical_bytes(DEFAULT_CANONICAL, encode_features([t], "float32")) for t in pair]
        assert codes[0] == codes[1]


def _slow(rule: CanonicalRule, payload: bytes) -> bytes:
    from secure_ci.partition import decode_features

    return rule.encode([t.numpy() for t in decode_features(payload)])


RULES = st.sampled_from(
    [DEFAULT_CANONICAL, CanonicalRule("topk", k=3), CanonicalRule("quantize", step=0.01)]
)


@given(
    RULES,
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 5), max_size=3),
            st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64]),
        ),
        max_size=3,
    ),
    st.sampled_from(["float32", "float16", "int8", "float32+lz4"]),
    st.integers(0, 2**32 - 1),
)
def test_the_fast_path_gives_the_decoders_bytes(
    rule: CanonicalRule, specs: list[tuple[list[int], torch.dtype]], codec: str, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = [(torch.randn(shape, generator=generator) * 4).to(dtype) for shape, dtype in specs]
    payload = encode_features(tensors, codec)
    assert canonical_bytes(rule, payload) == _slow(rule, payload)


@given(RULES, st.binary(max_size=8), st.integers(0, 200), st.sampled_from(["cut", "flip", "add"]))
def test_damaged_payloads_agree_with_the_decoder(
    rule: CanonicalRule, junk: bytes, where: int, how: str
) -> None:
    payload = encode_features([torch.tensor([[0.5, math.nan, -math.inf, 2.0]])], "float32")
    pos = where % len(payload)
    damaged = {
        "cut": payload[:pos],
        "flip": payload[:pos] + bytes([payload[pos] ^ 0xFF]) + payload[pos + 1 :],
        "add": payload + junk,
    }[how]
    try:
        expected = _slow(rule, damaged)
    except CodecError:
        with pytest.raises(CodecError):
            canonical_bytes(rule, damaged)
    else:
        assert canonical_bytes(rule, damaged) == expected
