"""The container, canonical JSON and safetensors parsers refuse hostile input precisely."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from package_helpers import digits_package, raw_container, sections

from secure_ci.exceptions import PackageError
from secure_ci.package import decode_weights, encode_weights, read_torch_state_dict
from secure_ci.package._format import (
    MAX_JSON_DEPTH,
    MAX_MANIFEST_BYTES,
    MAX_WEIGHTS_BYTES,
    canonical_json,
    decode_container,
    encode_container,
    json_depth,
    parse_json,
    scan_depth,
)
from secure_ci.package._weights import MAX_TENSORS

WEIGHTS = encode_weights({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)})


def test_container_round_trip() -> None:
    data = encode_container({"x": [1, 2.5, "s", None, True]}, WEIGHTS)
    container = decode_container(data)
    assert container.manifest == {"x": [1, 2.5, "s", None, True]}
    assert container.weights == WEIGHTS
    assert len(container.digest) == 32
    assert data.endswith(container.digest)


def test_every_truncation_and_extension_is_refused() -> None:
    data = encode_container({"k": "v"}, WEIGHTS)
    for end in range(len(data)):
        with pytest.raises(PackageError):
            decode_container(data[:end])
    for extra in (b"\x00", b"x" * 33, data):
        with pytest.raises(PackageError, match="extra bytes"):
            decode_container(data + extra)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (raw_container(b"{}", WEIGHTS, version=3), "version 3"),
        (raw_container(b"{}", WEIGHTS, flags=1), "flags"),
        (b"SCIPKH" + raw_container(b"{}", WEIGHTS)[6:], "bad magic"),
        (raw_container(b"{", WEIGHTS), "manifest length"),
        (raw_container(b"[]", WEIGHTS), "must be a JSON object"),
        (raw_container(b'{"a": 1}', WEIGHTS), "not canonical"),
        (raw_container(b'{"a":1,"a":1}', WEIGHTS), "duplicate key"),
        (raw_container(b'{"a":NaN}', WEIGHTS), "not valid JSON"),
        (raw_container(b'{"a":1e400}', WEIGHTS), "cannot be encoded"),
        (raw_container(b'{"a":"\xff"}', WEIGHTS), "not valid JSON"),
        (raw_container(b"[" * 100_000 + b"]" * 100_000, WEIGHTS), "not valid JSON|deeper"),
    ],
)
def test_malformed_containers(raw: bytes, message: str) -> None:
    with pytest.raises(PackageError, match=message):
        decode_container(raw)


def test_declared_lengths_are_bounded_before_anything_is_read() -> None:
    head = struct.pack("<6sBBI", b"SCIPKG", 1, 0, MAX_MANIFEST_BYTES + 1)
    with pytest.raises(PackageError, match="manifest length"):
        decode_container(head + b"{}")
    body = struct.pack("<6sBBI", b"SCIPKG", 1, 0, 2) + b"{}" + struct.pack("<Q", 2**64 - 1)
    with pytest.raises(PackageError, match="weights length"):
        decode_container(body + b"\x00" * 32)
    with pytest.raises(PackageError, match=r"manifest of \d+ bytes exceeds"):
        encode_container({"a": "x" * MAX_MANIFEST_BYTES}, b"")
    with pytest.raises(PackageError, match="must be bytes"):
        decode_container(bytearray(b"SCIPKG"))  # type: ignore[arg-type]


def test_deep_nesting_is_refused_before_parsing_even_with_a_raised_recursion_limit() -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(1_000_000)  # json.loads would overflow the C stack: it never runs
    try:
        with pytest.raises(PackageError, match="deeper than"):
            parse_json(deep, "x", canonical=False)
        with pytest.raises(PackageError, match="deeper than"):
            decode_weights(struct.pack("<Q", len(deep)) + deep)
    finally:
        sys.setrecursionlimit(previous)


def test_scan_depth_reads_strings_as_a_parser_does() -> None:
    assert scan_depth(b'{"a":"[[[","b":"\\"}') == 1
    assert scan_depth(b'["\\"]') == 1
    assert scan_depth(b'["\\"[[["]') == 1
    assert scan_depth(b'["a"],[[1]]') == 2
    assert scan_depth(b"") == 0


@given(
    st.recursive(
        st.none() | st.integers() | st.text(alphabet='[]{}"\\ab\u00e9', max_size=8),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(alphabet='[]{}"\\ab', max_size=4), children, max_size=3)
        ),
        max_leaves=10,
    ),
    st.booleans(),
)
def test_scan_depth_equals_the_parsed_depth(value: object, ascii_only: bool) -> None:
    for raw in (
        json.dumps(value, ensure_ascii=ascii_only).encode(),
        json.dumps(value, indent=1, ensure_ascii=ascii_only).encode(),
    ):
        assert scan_depth(raw) == json_depth(json.loads(raw))


def test_json_depth_is_bounded() -> None:
    ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json(ok, "x", canonical=True) is not None
    deep = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(PackageError, match="deeper than"):
        parse_json(deep, "x", canonical=True)
    deep_objects = b'{"a":' * 9 + b"1" + b"}" * 9
    with pytest.raises(PackageError, match="deeper than"):
        parse_json(deep_objects, "x", canonical=True)
    with pytest.raises(PackageError, match="exceeds"):
        parse_json(b"[]" * 10, "x", canonical=False, max_bytes=8)


@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=8),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=4), children, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_canonical_json_round_trips(value: object) -> None:
    raw = canonical_json({"v": value})
    depth_ok = json_depth(json.loads(raw)) <= MAX_JSON_DEPTH
    if not depth_ok:
        with pytest.raises(PackageError, match="deeper"):
            parse_json(raw, "x", canonical=True)
        return
    assert canonical_json(parse_json(raw, "x", canonical=True)) == raw


@given(st.binary(max_size=64))
def test_parse_json_raises_only_package_errors(raw: bytes) -> None:
    with contextlib.suppress(PackageError):
        parse_json(raw, "x", canonical=False)


# ----------------------------------------------------------------------------- safetensors


def _safetensors(header: object, data: bytes, *, raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_weights_round_trip() -> None:
    state = {
        "w": torch.randn(3, 4),
        "h": torch.randn(2).half(),
        "n": torch.tensor(7),
        "b": torch.tensor([True, False]),
        "bf": torch.ones(2, dtype=torch.bfloat16),
    }
    loaded = decode_weights(encode_weights(state))
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)
        assert loaded[name].dtype == tensor.dtype


def test_shared_and_strided_tensors_are_written_as_copies() -> None:
    base = torch.randn(4, 4)
    loaded = decode_weights(encode_weights({"a": base, "b": base, "t": base.t()}))
    assert torch.equal(loaded["a"], loaded["b"])
    assert torch.equal(loaded["t"], base.t())


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x01\x00", "fewer than 8 bytes"),
        (struct.pack("<Q", 2**63) + b"{}", "header length"),
        (struct.pack("<Q", 100) + b"{}", "header length"),
        (_safetensors([], b""), "JSON object"),
        (_safetensors({"a": {**F32_2, "dtype": "F8_E4M3"}}, bytes(8)), "unsupported dtype"),
        (_safetensors({"a": {**F32_2, "shape": [1] * 9}}, bytes(8)), "shape"),
        (_safetensors({"a": {**F32_2, "shape": [-2]}}, bytes(8)), "shape"),
        (_safetensors({"a": {**F32_2, "shape": [3]}}, bytes(8)), "do not match its shape"),
        (_safetensors({"a": {**F32_2, "data_offsets": [0, 16]}}, bytes(8)), "outside the data"),
        (_safetensors({"a": {**F32_2, "data_offsets": [8, 0]}}, bytes(8)), "outside the data"),
        (_safetensors({"a": F32_2}, bytes(12)), "tensors cover 8"),
        (_safetensors({"a": F32_2, "b": F32_2}, bytes(16)), "gap or overlapping"),
        (_safetensors({"a": {**F32_2, "extra": 1}}, bytes(8)), "exactly dtype"),
        (_safetensors({"": F32_2}, bytes(8)), "name"),
        (_safetensors({"__metadata__": {"a": 1}}, b""), "__metadata__"),
        (_safetensors({}, b"", raw_header=b'{"a":1,"a":2}'), "duplicate key"),
        (_safetensors({}, b"", raw_header=b"[" * 50 + b"]" * 50), "deeper"),
        (_safetensors({"a": {**F32_2, "shape": [True, 1]}}, bytes(8)), "shape"),
    ],
)
def test_hostile_safetensors_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(PackageError, match=message):
        decode_weights(raw)


def test_tensor_count_and_size_are_bounded() -> None:
    header = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
              for i in range(MAX_TENSORS + 1)}  # fmt: skip
    with pytest.raises(PackageError, match="exceed the limit"):
        decode_weights(_safetensors(header, b""))
    with pytest.raises(PackageError, match="exceed"):
        encode_weights({f"t{i}": torch.zeros(0) for i in range(MAX_TENSORS + 1)})
    assert MAX_WEIGHTS_BYTES < 2**31


@given(st.binary(max_size=200))
def test_decode_weights_raises_only_package_errors(tail: bytes) -> None:
    for raw in (tail, struct.pack("<Q", len(tail)) + tail, WEIGHTS[:8] + tail):
        with contextlib.suppress(PackageError):
            decode_weights(raw)


@given(st.data())
def test_flipped_bytes_in_weights_raise_only_package_errors(data: st.DataObject) -> None:
    raw = bytearray(WEIGHTS)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(PackageError):
        decode_weights(bytes(raw))


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled!",))


def test_torch_state_dicts_load_with_weights_only(capsys: pytest.CaptureFixture[str]) -> None:
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}}, buffer)
    assert torch.equal(read_torch_state_dict(buffer.getvalue())["w"], torch.ones(2))
    evil = io.BytesIO()
    torch.save({"w": torch.ones(2), "x": _Boom()}, evil)
    with pytest.raises(PackageError, match="not a torch state dict"):
        read_torch_state_dict(evil.getvalue())
    assert "unpickled!" not in capsys.readouterr().out
    for value in ({"w": 3}, [torch.ones(1)], {1: torch.ones(1)}):
        buffer = io.BytesIO()
        torch.save(value, buffer)
        with pytest.raises(PackageError, match="flat state dict"):
            read_torch_state_dict(buffer.getvalue())
    with pytest.raises(PackageError, match="not a torch state dict"):
        read_torch_state_dict(b"garbage")


def test_the_digits_package_parses_section_by_section() -> None:
    manifest, weights = sections(digits_package())
    assert set(manifest) >= {"model_id", "weights", "analysis", "profiles", "codecs"}
    assert decode_weights(weights)
