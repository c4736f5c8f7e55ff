"""Feature codecs: round trips, sizes, and a decoder that only ever raises CodecError."""

from __future__ import annotations

import contextlib
import random
import struct

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from secure_ci.exceptions import CodecError
from secure_ci.partition import CODECS, TensorSpec, decode_features, encode_features
from secure_ci.partition._codec import MAGIC

QUANTIZED = {"int8": 255, "int4": 15}

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
floats = st.floats(-1e4, 1e4, allow_nan=False, width=32)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def _channel_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(channels, rest) with channel = dim 1, as the codec quantizes."""
    if tensor.dim() < 2:
        return tensor.reshape(1, -1)
    lead, channels = tensor.shape[0], tensor.shape[1]
    return tensor.reshape(lead, channels, -1).transpose(0, 1).reshape(channels, -1)


@given(array=hnp.arrays(np.float32, shapes, elements=floats), codec=st.sampled_from(CODECS))
def test_round_trip_error_is_bounded(array: np.ndarray, codec: str) -> None:
    tensor = _tensor(array)
    (decoded,) = decode_features(encode_features([tensor], codec))
    assert decoded.dtype == torch.float32
    assert decoded.shape == tensor.shape
    base = codec.partition("+")[0]
    if base == "float32":
        assert torch.equal(decoded, tensor)
    elif base == "float16":
        assert torch.allclose(decoded, tensor.half().float())
    elif tensor.numel():
        grid, got = _channel_rows(tensor), _channel_rows(decoded)
        low, high = grid.min(dim=1).values, grid.max(dim=1).values
        step = (high - low) / QUANTIZED[base]
        # half a step, plus float16 rounding of the per-channel scale and zero point
        bound = step / 2 + (low.abs() + high.abs()) * 2e-3 + 1e-6
        assert bool(((got - grid).abs() <= bound[:, None]).all())


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(12, dtype=torch.int64).reshape(3, 4),
        torch.tensor([True, False, True]),
        torch.randint(-128, 127, (2, 3), dtype=torch.int8),
        torch.randn(2, 3).to(torch.bfloat16),
        torch.randn(2, 3, dtype=torch.float64),
        torch.tensor(3.5),
        torch.empty(0, 4, 2),
    ],
    ids=["int64", "bool", "int8", "bfloat16", "float64", "scalar", "empty"],
)
def test_dtypes_and_shapes_survive(codec: str, tensor: torch.Tensor) -> None:
    (decoded,) = decode_features(encode_features([tensor], codec))
    assert decoded.dtype == tensor.dtype
    assert decoded.shape == tensor.shape
    if not tensor.is_floating_point() or codec.startswith("float32"):
        assert torch.equal(decoded, tensor)


def test_several_tensors_and_expected_specs() -> None:
    tensors = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8).relu(), torch.arange(3)]
    specs = [TensorSpec((1, 4, 8, 8), "float32")] * 2 + [TensorSpec((3,), "int64")]
    decoded = decode_features(encode_features(tensors, "int8+lz4"), expected=specs)
    assert [t.shape for t in decoded] == [t.shape for t in tensors]
    with pytest.raises(CodecError, match="expected shape"):
        decode_features(encode_features(tensors, "int8"), expected=specs[::-1])
    with pytest.raises(CodecError, match="expected 2 tensors"):
        decode_features(encode_features(tensors, "int8"), expected=specs[:2])
    with pytest.raises(CodecError, match="expected dtype"):
        decode_features(
            encode_features(tensors[:1], "int8"), expected=[TensorSpec((1, 4, 8, 8), "float16")]
        )


@pytest.mark.parametrize(("codec", "limit"), [("int8", 0.26), ("int4", 0.14)])
def test_quantized_size_stays_within_the_targets(codec: str, limit: float) -> None:
    # 16 channels of 16x16: per-channel float16 parameters + header must stay small
    tensor = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    assert len(encode_features([tensor], codec)) / (4 * tensor.numel()) <= limit


def test_overflowing_parameters_fall_back_to_float32() -> None:
    tensor = torch.tensor([[1e30, -1e30, 0.0]])
    (decoded,) = decode_features(encode_features([tensor], "int8"))
    assert torch.allclose(decoded, tensor, rtol=0.01, atol=1e28)


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_quantizing_non_finite_values_is_refused(codec: str) -> None:
    with pytest.raises(CodecError, match="non-finite"):
        encode_features([torch.tensor([1.0, float("nan")])], codec)


@pytest.mark.parametrize("codec", ["int2", "int8+gzip", "int8+", "", "float32+zstd+lz4"])
def test_unknown_codec_is_refused(codec: str) -> None:
    with pytest.raises(CodecError, match="unknown codec"):
        encode_features([torch.zeros(2)], codec)


def test_unencodable_inputs_are_refused() -> None:
    with pytest.raises(CodecError):
        encode_features([torch.zeros(2, dtype=torch.complex64)], "float32")
    with pytest.raises(CodecError):
        encode_features([torch.zeros((1,) * 9)], "float32")
    with pytest.raises(CodecError):
        encode_features([torch.zeros(1)] * 256, "float32")


def _header(codec: int, shape: tuple[int, ...], dtype: int = 1, flags: int = 0) -> bytes:
    prefix = struct.pack("<4sBBB", MAGIC, 1, codec, 1)
    return (
        prefix
        + struct.pack("<BBB", dtype, flags, len(shape))
        + struct.pack(f"<{len(shape)}I", *shape)
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated header"),
        (b"XXXX\x01\x00\x00", "bad magic"),
        (MAGIC + b"\x02\x00\x00", "version"),
        (MAGIC + b"\x01\x07\x00", "unknown codec id"),
        (MAGIC + b"\x01\x30\x00", "unknown codec id"),
        (MAGIC + b"\x01\x00\x01", "truncated descriptor"),
        (MAGIC + b"\x01\x00\x01\x63\x00\x00", "unknown dtype"),
        (MAGIC + b"\x01\x00\x01\x01\x00\x09", "dimensions exceed"),
        (MAGIC + b"\x01\x00\x01\x01\x00\x02\x01\x00", "truncated shape"),
        (_header(0, (2,), flags=1) + bytes(8), "invalid flags"),
        (_header(2, (2,), flags=2) + bytes(8), "invalid flags"),
        (_header(0, (2,)) + bytes(7), "header declares 8"),
        (_header(0, (2,)) + bytes(9), "header declares 8"),
        (_header(0, (2**32 - 1,) * 8), "exceeds the limit"),
        (_header(0, (3,), dtype=10) + b"\x00\x01\x02", "0 or 1"),
        (_header(2, (2,)) + struct.pack("<2e", float("inf"), 0.0) + b"\x00\x00", "finite"),
        (_header(2, (2,)) + struct.pack("<2e", -1.0, 0.0) + b"\x00\x00", "non-negative"),
        (_header(3, (3,)) + bytes(4) + b"\x00\xf0", "padding nibble"),
        (_header(2, (2,), flags=1) + struct.pack("<2f", 3e38, 3e38) + b"\xff\xff", "overflow"),
        (_header(0x12, (2,)) + b"\x00", "corrupt compressed"),
        (_header(0x11, (2,)) + b"\x28\xb5\x2f\xfd", "corrupt compressed"),
    ],
)
def test_malformed_input_is_a_codec_error(data: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_features(data)


def test_sizes_are_bounded_before_decompressing() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    # the header declares 8 bytes, the frame 64 MiB: refused without inflating it
    with pytest.raises(CodecError, match="frame declares"):
        decode_features(_header(0x10, (2,)) + bomb)
    # a header declaring more than max_bytes is refused before anything is inflated
    with pytest.raises(CodecError, match="exceed"):
        decode_features(_header(0x10, (16 << 20,)) + bomb, max_bytes=1 << 20)
    with pytest.raises(CodecError, match="exceed"):
        decode_features(encode_features([torch.zeros(300)], "float32"), max_bytes=1000)
    trailing = _header(0x10, (2,)) + zstandard.ZstdCompressor().compress(bytes(8)) + b"x"
    with pytest.raises(CodecError, match="trailing"):
        decode_features(trailing)


def test_non_bytes_input_is_a_codec_error() -> None:
    with pytest.raises(CodecError):
        decode_features("SCIF")  # type: ignore[arg-type]
    data = encode_features([torch.ones(2, 2)], "int4")
    assert torch.equal(decode_features(memoryview(data))[0], decode_features(data)[0])


@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode_features(data)


@given(st.binary(max_size=64), st.sampled_from(CODECS))
def test_arbitrary_bodies_after_a_valid_header(body: bytes, codec: str) -> None:
    valid = encode_features([torch.ones(1, 2, 3)], codec)
    with contextlib.suppress(CodecError):
        decode_features(valid[:20] + body)


def _valid_samples() -> list[bytes]:
    generator = torch.Generator().manual_seed(1)
    tensors = [torch.randn(1, 3, 4, 4, generator=generator), torch.arange(5)]
    return [encode_features(tensors, codec) for codec in CODECS]


def test_every_truncation_is_a_codec_error() -> None:
    for data in _valid_samples():
        for end in range(len(data)):
            with pytest.raises(CodecError):
                decode_features(data[:end])


def test_mutation_fuzzing_only_raises_codec_error() -> None:
    rng = random.Random(20261124)
    samples = _valid_samples()
    decoded_ok = 0
    for _ in range(4000):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 4)):
            action = rng.randrange(4)
            position = rng.randrange(len(data))
            if action == 0:
                data[position] = rng.randrange(256)
            elif action == 1:
                data[position] ^= 1 << rng.randrange(8)
            elif action == 2:
                del data[position : position + rng.randint(1, 8)]
            else:
                data[position:position] = rng.randbytes(rng.randint(1, 8))
        try:
            tensors = decode_features(bytes(data), max_bytes=1 << 16)
        except CodecError:
            continue
        decoded_ok += 1
        assert all(isinstance(t, torch.Tensor) for t in tensors)
    assert decoded_ok < 4000  # most mutations must be caught, some (payload flips) decode
