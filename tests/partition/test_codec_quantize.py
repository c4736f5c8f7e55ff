"""The vectorised int8/int4 kernels against a plain per-channel reference of wire format v1.

The reference is the straightforward implementation the fast kernels replaced (channel-major
copy, per-channel scale and zero as float16 or float32, round to nearest, clip). Bytes made
by either encoder must decode identically with either decoder (the format did not change),
and the fast encoder must be as accurate as the reference, on both of its paths: the generic
vectorised one and fbgemm's fused kernels (large single-row tensors, ``_fused``).
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from secure_ci.exceptions import CodecError
from secure_ci.partition import _fused, decode_features, encode_features
from secure_ci.partition._codec import MAGIC
from secure_ci.partition._fused import FUSED_MIN_REST
from secure_ci.partition._quantize import pack_nibbles, unpack_nibbles

QMAX = {"int8": 255, "int4": 15}
F16_MAX = float(np.finfo(np.float16).max)
F16_TINY = float(np.finfo(np.float16).smallest_subnormal)


def _channel_major(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    if values.ndim < 2:
        return values.reshape(1, -1)
    lead, channels = values.shape[:2]
    return values.reshape(lead, channels, -1).transpose(1, 0, 2).reshape(channels, -1)


def _reference_encode(tensor: torch.Tensor, codec: str) -> bytes:
    """Wire format v1, one float32 tensor, the plain way (the pre-vectorisation encoder)."""
    qmax = QMAX[codec]
    values = tensor.numpy()
    grid = _channel_major(values)
    lo, hi = grid.min(axis=1), grid.max(axis=1)
    exact = np.stack([(hi.astype(np.float64) - lo) / qmax, lo])
    fits = np.abs(exact).max() <= F16_MAX and not ((exact[0] > 0) & (exact[0] < F16_TINY)).any()
    params = exact.astype(np.float16) if fits else exact.astype(np.float32)
    step = params[0].astype(np.float32)
    safe = np.where(step > 0, step, np.float32(1.0))
    with np.errstate(over="ignore", invalid="ignore"):
        q = np.rint((grid - params[1].astype(np.float32)[:, None]) / safe[:, None])
    q = np.clip(q, 0, qmax).astype(np.uint8).reshape(-1)
    if qmax == 15:
        q = np.concatenate([q, np.zeros(q.size % 2, np.uint8)])
        q = (q[0::2] | (q[1::2] << 4)).astype(np.uint8)
    header = struct.pack("<4sBBB", MAGIC, 1, 2 if qmax == 255 else 3, 1)
    header += struct.pack("<BBB", 1, 0 if fits else 1, values.ndim)
    header += struct.pack(f"<{values.ndim}I", *values.shape)
    return header + params.astype(params.dtype.newbyteorder("<")).tobytes() + q.tobytes()


def _reference_decode(data: bytes, shape: tuple[int, ...], codec: str) -> torch.Tensor:
    ndim = len(shape)
    offset = 7 + 3 + 4 * ndim
    f32 = data[8] & 1
    channels = shape[1] if ndim >= 2 else 1
    numel = int(np.prod(shape))
    pdtype = "<f4" if f32 else "<f2"
    nparams = 2 * channels * np.dtype(pdtype).itemsize
    params = np.frombuffer(data[offset : offset + nparams], pdtype).astype(np.float32)
    q = np.frombuffer(data[offset + nparams :], np.uint8)
    if codec == "int4":
        q = np.stack([q & 0x0F, q >> 4], axis=1).reshape(-1)[:numel]
    grid = q.reshape(channels, -1).astype(np.float32) * params[:channels, None]
    grid = grid + params[channels:, None]
    if ndim < 2:
        return torch.from_numpy(grid.reshape(shape))
    lead = shape[0]
    back = grid.reshape(channels, lead, -1).transpose(1, 0, 2)
    return torch.from_numpy(np.ascontiguousarray(back).reshape(shape))


shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=7)
floats = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=150)
@given(
    array=hnp.arrays(np.float32, shapes, elements=floats),
    codec=st.sampled_from(sorted(QMAX)),
)
def test_both_encoders_decode_identically_with_both_decoders(
    array: np.ndarray[Any, Any], codec: str
) -> None:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    shape = tuple(tensor.shape)
    for data in (encode_features([tensor], codec), _reference_encode(tensor, codec)):
        (ours,) = decode_features(data)
        assert torch.equal(ours, _reference_decode(data, shape, codec))


@settings(max_examples=150)
@given(
    array=hnp.arrays(np.float32, shapes, elements=floats),
    codec=st.sampled_from(sorted(QMAX)),
)
def test_encoded_bytes_keep_the_reference_size_and_parameters(
    array: np.ndarray[Any, Any], codec: str
) -> None:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    ours, theirs = encode_features([tensor], codec), _reference_encode(tensor, codec)
    assert len(ours) == len(theirs)
    start = 10 + 4 * tensor.dim()
    assert ours[:start] == theirs[:start]  # header, dtype, flags (float16/32 parameters), shape
    channels = tensor.shape[1] if tensor.dim() >= 2 else 1
    pdtype = "<f4" if theirs[8] & 1 else "<f2"
    end = start + 2 * channels * np.dtype(pdtype).itemsize
    # the same per-channel scale and zero (as numbers: amin may return -0.0 where min gives 0.0)
    ours_params = np.frombuffer(ours[start:end], pdtype)
    assert np.array_equal(ours_params, np.frombuffer(theirs[start:end], pdtype))


@pytest.mark.parametrize("codec", sorted(QMAX))
@pytest.mark.parametrize(
    "shape", [(1, 64, 56, 56), (8, 64, 14, 14), (4, 197, 48), (3, 512), (1000,)]
)
def test_accuracy_matches_the_reference(codec: str, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    tensor = torch.randn(shape, generator=generator) * 3 + torch.rand(shape, generator=generator)
    (ours,) = decode_features(encode_features([tensor], codec))
    reference = _reference_decode(_reference_encode(tensor, codec), shape, codec)
    our_error, their_error = (ours - tensor).abs(), (reference - tensor).abs()
    # the same error up to parameter rounding: round half up instead of half to even,
    # x * (1/step) instead of x / step, and on the fused path float32 parameters (int8) or a
    # step from the float16 zero point (int4), which move the step by about 2**-11
    assert float(our_error.max()) <= float(their_error.max()) * (1 + 2e-3) + 1e-6
    assert float(our_error.mean()) == pytest.approx(float(their_error.mean()), rel=2e-3)


@given(st.binary(max_size=301))
def test_nibble_packing_matches_the_plain_form(raw: bytes) -> None:
    codes = np.frombuffer(raw, np.uint8) & 0x0F
    plain = np.concatenate([codes, np.zeros(codes.size % 2, np.uint8)])
    packed = pack_nibbles(codes)
    assert packed.tobytes() == (plain[0::2] | (plain[1::2] << 4)).astype(np.uint8).tobytes()
    assert unpack_nibbles(packed, codes.size).tobytes() == codes.tobytes()


@settings(max_examples=60)
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
    where=st.integers(0, 10_000),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    codec=st.sampled_from(sorted(QMAX)),
)
def test_any_non_finite_value_is_refused(
    shape: tuple[int, ...], where: int, bad: float, codec: str
) -> None:
    tensor = torch.randn(shape)
    tensor.view(-1)[where % tensor.numel()] = bad
    with pytest.raises(CodecError, match="non-finite"):
        encode_features([tensor], codec)


@pytest.mark.parametrize("codec", sorted(QMAX))
def test_constant_channels_and_extreme_ranges(codec: str) -> None:
    tensor = torch.zeros(2, 3, 5)
    tensor[:, 0] = 1000.3
    tensor[:, 1] = torch.from_numpy(np.linspace(-1.5e38, 1.5e38, 10, dtype=np.float32)).view(2, 5)
    tensor[:, 2] = torch.from_numpy(np.linspace(0, 1e-40, 10, dtype=np.float32)).view(2, 5)
    assert bool(torch.isfinite(tensor).all())
    data = encode_features([tensor], codec)
    (ours,) = decode_features(data)
    assert torch.equal(ours, _reference_decode(data, (2, 3, 5), codec))
    assert bool((ours[:, 0] == ours[0, 0, 0]).all())
    assert abs(float(ours[0, 0, 0]) - 1000.3) <= 0.25  # the float16 zero point
    assert float((ours[:, 2] - tensor[:, 2]).abs().max()) <= 1e-40
    edge = torch.tensor([[-3.4e38, 3.39e38], [-3.39e38, 3.4e38]])  # channels near -+max
    (decoded,) = decode_features(encode_features([edge], codec))
    assert float((decoded - edge).abs().max()) <= 1e36
    # codes of a range wider than float32 cannot decode (q * scale overflows): refused up front
    with pytest.raises(CodecError, match="range exceeds float32"):
        encode_features([torch.tensor([-3e38, 3e38])], codec)


def _q8(shape: tuple[int, ...], scale: float, zero: float, codes: bytes) -> bytes:
    header = struct.pack("<4sBBBBBB", MAGIC, 1, 2, 1, 1, 1, len(shape))
    return header + struct.pack(f"<{len(shape)}I", *shape) + struct.pack("<2f", scale, zero) + codes


def test_hostile_parameters_overflow_only_where_codes_reach() -> None:
    # scale * 255 overflows float32, but codes that stay low decode as before
    (low,) = decode_features(_q8((3,), 3e36, 0.0, bytes([0, 1, 2])))
    scale = np.float32(3e36)
    assert low.tolist() == [0.0, float(scale), float(scale * np.float32(2))]
    with pytest.raises(CodecError, match="overflow"):
        decode_features(_q8((3,), 3e36, 0.0, bytes([0, 1, 255])))
    with pytest.raises(CodecError, match="overflow"):
        decode_features(_q8((1,), 2e38, 2e38, bytes([1])))
    for scale, zero in ((-1.0, 0.0), (float("nan"), 0.0), (1.0, float("inf"))):
        with pytest.raises(CodecError, match="not finite and non-negative"):
            decode_features(_q8((1,), scale, zero, bytes([1])))


def _flags(data: bytes) -> int:
    return data[8]


def _error_bound(tensor: torch.Tensor, qmax: int) -> torch.Tensor:
    """Half a step, plus float16 rounding of the per-channel parameters (as test_codec)."""
    rows = tensor.reshape(tensor.shape[1], -1) if tensor.dim() >= 2 else tensor.reshape(1, -1)
    low, high = rows.min(dim=1).values, rows.max(dim=1).values
    return ((high - low) / qmax / 2 + (low.abs() + high.abs()) * 2e-3 + 1e-6)[:, None]


@settings(max_examples=60)
@given(
    channels=st.integers(1, 6),
    rest=st.sampled_from([FUSED_MIN_REST, FUSED_MIN_REST + 1, 1024]),
    scale=st.floats(1e-3, 1e4),
    offset=st.floats(-1e4, 1e4),
    dead=st.booleans(),
    codec=st.sampled_from(sorted(QMAX)),
)
def test_fused_path_is_as_accurate_and_decodes_like_the_reference(
    channels: int, rest: int, scale: float, offset: float, dead: bool, codec: str
) -> None:
    generator = torch.Generator().manual_seed(channels * rest)
    tensor = torch.randn(1, channels, rest, generator=generator) * scale + offset
    if dead:
        tensor[0, 0] = 0.0  # a constant channel, as ReLU leaves them
    data = encode_features([tensor], codec)
    (ours,) = decode_features(data)
    assert torch.equal(ours, _reference_decode(data, (1, channels, rest), codec))
    rows = ours.reshape(channels, -1) - tensor.reshape(channels, -1)
    assert bool((rows.abs() <= _error_bound(tensor, QMAX[codec])).all())


def test_fused_path_is_taken_only_where_it_is_the_format() -> None:
    generator = torch.Generator().manual_seed(3)
    big = torch.randn(1, 8, 32, 32, generator=generator)
    assert _flags(encode_features([big], "int8")) == 1  # fused: float32 parameters
    assert _flags(encode_features([big[:, :, :, :5]], "int8")) == 0  # 160 a row: generic
    assert _flags(encode_features([big.repeat(2, 1, 1, 1)], "int8")) == 0  # batch of 2
    narrow = big.clone()
    narrow[0, 3] = narrow[0, 3] * 1e-4  # fbgemm's epsilon would shift this channel's codes
    assert _flags(encode_features([narrow], "int8")) == 0  # generic: float16 parameters
    (decoded,) = decode_features(encode_features([narrow], "int8"))
    reference = _reference_decode(_reference_encode(narrow, "int8"), (1, 8, 32, 32), "int8")
    assert float((decoded - narrow).abs().max()) <= float((reference - narrow).abs().max())
    tiny = torch.zeros(1, 2, 600)
    tiny[0, 1, ::2] = 1e-7  # too narrow for a float16 int4 scale: generic, float32 parameters
    data = encode_features([tiny], "int4")
    assert _flags(data) == 1
    assert torch.equal(decode_features(data)[0], tiny)
    for bad in (float("nan"), float("inf"), float("-inf")):
        hostile = big.clone()
        hostile[0, 5, 7, 9] = bad
        for codec in QMAX:
            with pytest.raises(CodecError, match="non-finite"):
                encode_features([hostile], codec)


@pytest.mark.parametrize("codec", sorted(QMAX))
def test_both_paths_agree_in_accuracy(codec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(5)
    tensor = torch.randn(1, 64, 28, 28, generator=generator).relu_() * 4
    (fused,) = decode_features(encode_features([tensor], codec))
    monkeypatch.setattr(_fused, "_kernels", lambda: None)  # as on a build without fbgemm
    (generic,) = decode_features(encode_features([tensor], codec))
    fused_error, generic_error = (fused - tensor).abs(), (generic - tensor).abs()
    assert float(fused_error.max()) <= float(generic_error.max()) * (1 + 2e-3) + 1e-6
    assert float(fused_error.mean()) == pytest.approx(float(generic_error.mean()), rel=2e-3)
