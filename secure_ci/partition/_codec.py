"""Feature codecs: boundary tensors to bytes and back, with a self-describing header.

Layout (little-endian)::

    magic "SCIF" | version u8 | codec u8 | count u8
    count x (dtype u8 | flags u8 | ndim u8 | ndim x dim u32)
    body: the tensors' payloads, concatenated; zstd- or lz4-compressed as a whole if asked

The header fixes the exact length of every payload, so :func:`decode_features` checks every
size against ``max_bytes`` (including the decompressed size) before it allocates anything.
int8/int4 use per-channel affine quantization (channel = dim 1 of tensors with >= 2 dims):
``x ~= zero + q * scale``, scale and zero stored as float16 (flag bit 0 clear) or float32.
Non-floating tensors always travel raw.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lz4.block
import numpy as np
import torch
import zstandard

from secure_ci.exceptions import CodecError
from secure_ci.partition._plan import TensorSpec
from secure_ci.partition._quantize import F32_PARAMS, dequantize, quantize, unpack_nibbles

__all__ = ["CODECS", "DEFAULT_MAX_BYTES", "decode_features", "encode_features"]

MAGIC = b"SCIF"
VERSION = 1
DEFAULT_MAX_BYTES = 64 << 20
MAX_TENSORS = 255
MAX_NDIM = 8
_PREFIX = struct.Struct("<4sBBB")
_DESCRIPTOR = struct.Struct("<BBB")

_BASES = ("float32", "float16", "int8", "int4")
_LOSSLESS = ("", "zstd", "lz4")
CODECS: tuple[str, ...] = tuple(
    base + (f"+{stage}" if stage else "") for stage in _LOSSLESS for base in _BASES
)

# dtype code -> (torch dtype, numpy storage dtype of the raw bytes)
_DTYPES: dict[int, tuple[torch.dtype, np.dtype[Any]]] = {
    1: (torch.float32, np.dtype("<f4")),
    2: (torch.float16, np.dtype("<f2")),
    3: (torch.bfloat16, np.dtype("<u2")),
    4: (torch.float64, np.dtype("<f8")),
    5: (torch.int64, np.dtype("<i8")),
    6: (torch.int32, np.dtype("<i4")),
    7: (torch.int16, np.dtype("<i2")),
    8: (torch.int8, np.dtype("i1")),
    9: (torch.uint8, np.dtype("u1")),
    10: (torch.bool, np.dtype("?")),
}
_CODES = {dtype: code for code, (dtype, _) in _DTYPES.items()}


@dataclass(frozen=True)
class _Descriptor:
    dtype_code: int
    flags: int
    shape: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype_code][0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def channels(self) -> int:
        return self.shape[1] if len(self.shape) >= 2 else 1


def _parse_codec(codec: str) -> tuple[int, int]:
    base, _, stage = codec.partition("+")
    if base not in _BASES or stage not in _LOSSLESS or (stage == "" and "+" in codec):
        raise CodecError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    return _BASES.index(base), _LOSSLESS.index(stage)


_KINDS = ("raw", "f16", "q8", "q4")


def _kind(base: int, desc: _Descriptor) -> str:
    """How a tensor travels: 'raw', 'f16', 'q8' or 'q4' (non-floats always raw)."""
    if not desc.dtype.is_floating_point or base == 0:
        return "raw"
    return _KINDS[base]


def _payload_len(kind: str, desc: _Descriptor) -> int:
    n = desc.numel
    if kind == "raw":
        return n * _DTYPES[desc.dtype_code][1].itemsize
    if kind == "f16":
        return 2 * n
    params = desc.channels * 2 * (4 if desc.flags & F32_PARAMS else 2)
    return params + (n if kind == "q8" else (n + 1) // 2)


def encode_features(tensors: Sequence[torch.Tensor], codec: str) -> bytes:
    """Encode boundary tensors with ``codec`` (one of :data:`CODECS`)."""
    base, stage = _parse_codec(codec)
    if len(tensors) > MAX_TENSORS:
        raise CodecError(f"{len(tensors)} tensors exceed the limit of {MAX_TENSORS}")
    header = [_PREFIX.pack(MAGIC, VERSION, stage << 4 | base, len(tensors))]
    body: list[bytes | memoryview] = []
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _CODES:
            raise CodecError(
                f"cannot encode {type(tensor).__name__} of dtype {getattr(tensor, 'dtype', None)}"
            )
        shape = tuple(tensor.shape)
        if len(shape) > MAX_NDIM or max(shape, default=0) >= 1 << 32:
            raise CodecError(f"tensor shape {shape} is not encodable")
        kind = "raw" if base == 0 or not tensor.is_floating_point() else _KINDS[base]
        if tensor.requires_grad or tensor.device.type != "cpu":
            tensor = tensor.detach().cpu()
        flags, payload = _encode_tensor(kind, tensor)
        header.append(_DESCRIPTOR.pack(_CODES[tensor.dtype], flags, len(shape)))
        header.append(struct.pack(f"<{len(shape)}I", *shape))
        body.extend(payload)
    if stage == 0:
        return b"".join([*header, *body])  # one copy of the payloads, straight from the arrays
    raw = b"".join(body)
    if stage == 1:
        raw = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(raw)
    else:
        raw = lz4.block.compress(raw, store_size=False)
    return b"".join(header) + raw


def _encode_tensor(kind: str, tensor: torch.Tensor) -> tuple[int, list[bytes | memoryview]]:
    """``(flags, payload buffers)`` of one tensor, joined once by the caller."""
    if kind == "raw":
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        array = tensor.contiguous().numpy()
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        return 0, [np.ascontiguousarray(little).data]
    values = tensor if tensor.dtype == torch.float32 else tensor.to(torch.float32)
    values = values.contiguous()
    if kind == "f16":
        # torch's float16 conversion is vectorised; numpy's is a scalar loop
        half = values.to(torch.float16).numpy()
        return 0, [half.astype("<f2", copy=False).data]
    return quantize(values, 255 if kind == "q8" else 15)


def decode_features(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    expected: Sequence[TensorSpec] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Decode bytes from :func:`encode_features`, validating everything before allocating.

    Raises :class:`CodecError` (and nothing else) on malformed, truncated, oversized or
    unexpected input; ``expected`` pins the tensors' shapes and dtypes.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"feature bytes must be bytes, not {type(data).__name__}")
    if len(data) > max_bytes:
        raise CodecError(f"{len(data)} feature bytes exceed the limit of {max_bytes}")
    view = memoryview(bytes(data)) if isinstance(data, memoryview) else memoryview(data)
    try:
        return _decode(view, max_bytes, expected)
    except (ValueError, TypeError, OverflowError, struct.error, RuntimeError) as exc:
        raise CodecError(f"malformed feature bytes: {exc}") from exc


def _decode(
    view: memoryview, max_bytes: int, expected: Sequence[TensorSpec] | None
) -> tuple[torch.Tensor, ...]:
    base, stage, descs, offset = _parse_header(view)
    kinds = [_kind(base, d) for d in descs]
    lengths = [_payload_len(k, d) for k, d in zip(kinds, descs, strict=True)]
    total = sum(lengths)
    if total > max_bytes:
        raise CodecError(f"declared payload of {total} bytes exceeds the limit of {max_bytes}")
    if expected is not None:
        _check_expected(descs, expected)
    body = _body(view[offset:], stage, total)
    tensors = []
    start = 0
    for kind, desc, length in zip(kinds, descs, lengths, strict=True):
        tensors.append(_decode_tensor(kind, desc, body[start : start + length]))
        start += length
    return tuple(tensors)


def _parse_header(view: memoryview) -> tuple[int, int, list[_Descriptor], int]:
    if len(view) < _PREFIX.size:
        raise CodecError(f"truncated header: {len(view)} bytes")
    magic, version, codec, count = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CodecError("bad magic: not secure-ci feature bytes")
    if version != VERSION:
        raise CodecError(f"unsupported codec format version {version}")
    base, stage = codec & 0x0F, codec >> 4
    if base >= len(_BASES) or stage >= len(_LOSSLESS):
        raise CodecError(f"unknown codec id 0x{codec:02x}")
    offset = _PREFIX.size
    descs = []
    for index in range(count):
        if len(view) < offset + _DESCRIPTOR.size:
            raise CodecError(f"truncated descriptor of tensor {index}")
        code, flags, ndim = _DESCRIPTOR.unpack_from(view, offset)
        offset += _DESCRIPTOR.size
        if code not in _DTYPES:
            raise CodecError(f"tensor {index}: unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise CodecError(f"tensor {index}: {ndim} dimensions exceed {MAX_NDIM}")
        if len(view) < offset + 4 * ndim:
            raise CodecError(f"truncated shape of tensor {index}")
        shape = struct.unpack_from(f"<{ndim}I", view, offset)
        offset += 4 * ndim
        desc = _Descriptor(code, flags, tuple(shape))
        quantized = _kind(base, desc) in ("q8", "q4")
        if flags & ~(F32_PARAMS if quantized else 0):
            raise CodecError(f"tensor {index}: invalid flags 0x{flags:02x}")
        descs.append(desc)
    return base, stage, descs, offset


def _check_expected(descs: Sequence[_Descriptor], expected: Sequence[TensorSpec]) -> None:
    if len(descs) != len(expected):
        raise CodecError(f"expected {len(expected)} tensors, got {len(descs)}")
    for index, (desc, spec) in enumerate(zip(descs, expected, strict=True)):
        if tuple(spec.shape) != desc.shape:
            raise CodecError(
                f"tensor {index}: expected shape {tuple(spec.shape)}, got {desc.shape}"
            )
        got = str(desc.dtype).removeprefix("torch.")
        if spec.dtype != got:
            raise CodecError(f"tensor {index}: expected dtype {spec.dtype}, got {got}")


def _body(rest: memoryview, stage: int, total: int) -> memoryview:
    if stage == 0:
        if len(rest) != total:
            raise CodecError(f"payload is {len(rest)} bytes, header declares {total}")
        return rest
    try:
        if stage == 1:
            raw = _unzstd(bytes(rest), total)
        else:
            raw = lz4.block.decompress(bytes(rest), uncompressed_size=max(total, 1))
    except (zstandard.ZstdError, lz4.block.LZ4BlockError, ValueError, MemoryError) as exc:
        raise CodecError(f"corrupt compressed payload: {exc}") from exc
    if len(raw) != total:
        raise CodecError(f"decompressed payload is {len(raw)} bytes, header declares {total}")
    return memoryview(raw)


def _unzstd(frame: bytes, total: int) -> bytes:
    declared = zstandard.frame_content_size(frame)
    if declared != total:
        raise CodecError(f"zstd frame declares {declared} bytes, header declares {total}")
    window = 1 << max(10, min(27, math.ceil(math.log2(max(total, 1)))))
    decompressor = zstandard.ZstdDecompressor(max_window_size=window).decompressobj()
    raw = decompressor.decompress(frame)
    if not decompressor.eof or decompressor.unused_data:
        raise CodecError("zstd payload is truncated or has trailing bytes")
    return raw


def _decode_tensor(kind: str, desc: _Descriptor, payload: memoryview) -> torch.Tensor:
    storage = _DTYPES[desc.dtype_code][1]
    if desc.numel == 0:
        return torch.empty(desc.shape, dtype=desc.dtype)
    if kind == "raw":
        if desc.dtype == torch.bool and bytes(payload).strip(b"\x00\x01"):
            raise CodecError("bool tensor bytes must be 0 or 1")
        array = np.frombuffer(payload, dtype=storage).astype(storage.newbyteorder("="))
        tensor = torch.from_numpy(array.reshape(desc.shape))
        return tensor.view(torch.bfloat16) if desc.dtype == torch.bfloat16 else tensor
    if kind == "f16":
        half = np.frombuffer(payload, dtype="<f2").astype("=f2")
        return torch.from_numpy(half.reshape(desc.shape)).to(desc.dtype)
    pdtype = "<f4" if desc.flags & F32_PARAMS else "<f2"
    nparams = 2 * desc.channels * np.dtype(pdtype).itemsize
    params = np.frombuffer(payload[:nparams], dtype=pdtype)
    codes = np.frombuffer(payload[nparams:], dtype=np.uint8)
    if kind == "q4":
        if desc.numel % 2 and codes.size and codes[-1] >> 4:
            raise CodecError("int4 padding nibble is not zero")
        codes = unpack_nibbles(codes, desc.numel)
    return dequantize(codes, params, desc.shape).to(desc.dtype)
