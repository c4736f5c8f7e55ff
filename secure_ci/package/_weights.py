"""Weights as safetensors bytes: written from a state dict, read back only after bounds checks.

safetensors layout: an 8-byte little-endian header length N, N bytes of JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus an optional
``__metadata__`` map of strings), then the data. Before the bytes reach the safetensors
library this module checks every bound (header length, JSON size and depth, tensor count,
dtypes, ranks and dimensions, and that the offsets tile the data exactly), so a hostile
file fails with a :class:`PackageError` naming the problem. Nothing here unpickles; a
``.pt`` state dict is read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from secure_ci.exceptions import PackageError
from secure_ci.package._format import MAX_WEIGHTS_BYTES, parse_json

__all__ = [
    "MAX_TENSORS",
    "MAX_WEIGHTS_HEADER_BYTES",
    "decode_weights",
    "encode_weights",
    "read_torch_state_dict",
]

MAX_TENSORS = 4096
MAX_WEIGHTS_HEADER_BYTES = 1 << 20
MAX_NAME = 256
MAX_NDIM = 8
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)  # fmt: skip


def encode_weights(state: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of ``state`` (CPU, contiguous, unshared copies of each tensor)."""
    if len(state) > MAX_TENSORS:
        raise PackageError(f"{len(state)} tensors exceed the limit of {MAX_TENSORS}")
    tensors = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _DTYPES:
            raise PackageError(f"weight {name!r} is not a tensor of a supported dtype")
        if not 0 < len(name) <= MAX_NAME or tensor.dim() > MAX_NDIM:
            raise PackageError(f"weight {name[:64]!r}: name or rank out of bounds")
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    data = _st_save(tensors)
    if len(data) > MAX_WEIGHTS_BYTES:
        raise PackageError(f"weights of {len(data)} bytes exceed {MAX_WEIGHTS_BYTES}")
    return data


def decode_weights(data: bytes) -> dict[str, torch.Tensor]:
    """Validate safetensors bytes against every bound, then load them (CPU tensors)."""
    if len(data) > MAX_WEIGHTS_BYTES:
        raise PackageError(f"weights of {len(data)} bytes exceed {MAX_WEIGHTS_BYTES}")
    if len(data) < 8:
        raise PackageError("weights are not a safetensors file: fewer than 8 bytes")
    (header_len,) = struct.unpack_from("<Q", data)
    if not 2 <= header_len <= MAX_WEIGHTS_HEADER_BYTES or 8 + header_len > len(data):
        raise PackageError(f"safetensors header length {header_len} is out of bounds")
    header = parse_json(
        bytes(data[8 : 8 + header_len]),
        "safetensors header",
        canonical=False,
        max_bytes=MAX_WEIGHTS_HEADER_BYTES,
    )
    _check_header(header, len(data) - 8 - header_len)
    try:
        return dict(_st_load(bytes(data)))
    except Exception as exc:  # the library's own validation: translate whatever it raises
        raise PackageError(f"safetensors rejected the weights: {str(exc)[:200]}") from None


def _check_header(header: Any, data_len: int) -> None:
    if not isinstance(header, dict):
        raise PackageError("safetensors header must be a JSON object")
    metadata = header.get("__metadata__", {})
    if (
        not isinstance(metadata, dict)
        or len(metadata) > 64
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) + len(v) <= 4096
            for k, v in metadata.items()
        )
    ):
        raise PackageError("safetensors __metadata__ must be a small map of strings")
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    if len(entries) > MAX_TENSORS:
        raise PackageError(f"{len(entries)} tensors exceed the limit of {MAX_TENSORS}")
    spans = []
    for name, entry in entries:
        if not 0 < len(name) <= MAX_NAME:
            raise PackageError(f"tensor name of {len(name)} characters is out of bounds")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise PackageError(f"tensor {name[:64]!r}: needs exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ITEMSIZE:
            raise PackageError(f"tensor {name[:64]!r}: unsupported dtype {str(dtype)[:16]!r}")
        if not _ints(shape, MAX_NDIM, 1 << 40):
            raise PackageError(f"tensor {name[:64]!r}: shape must be at most {MAX_NDIM} sizes")
        if not _ints(offsets, 2, data_len) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise PackageError(f"tensor {name[:64]!r}: data_offsets outside the data")
        if offsets[1] - offsets[0] != math.prod(shape) * _ITEMSIZE[dtype]:
            raise PackageError(f"tensor {name[:64]!r}: data_offsets do not match its shape")
        spans.append((offsets[0], offsets[1]))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise PackageError("safetensors data has a gap or overlapping tensors")
        end = stop
    if end != data_len:
        raise PackageError(f"safetensors data is {data_len} bytes, tensors cover {end}")


def _ints(value: object, max_len: int, top: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= max_len
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= top for v in value)
    )


def read_torch_state_dict(data: bytes) -> dict[str, torch.Tensor]:
    """A state dict from ``torch.save`` bytes, loaded with ``weights_only=True`` (no pickles
    of arbitrary objects); a ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is opened."""
    if len(data) > MAX_WEIGHTS_BYTES:
        raise PackageError(f"weights of {len(data)} bytes exceed {MAX_WEIGHTS_BYTES}")
    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's restricted unpickler: translate whatever it raises
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PackageError(f"not a torch state dict: {first[:200]}") from None
    if isinstance(value, dict):
        for key in ("model", "state_dict"):
            if isinstance(value.get(key), dict):
                value = value[key]
                break
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        raise PackageError("the .pt file does not hold a flat state dict of named tensors")
    return dict(value)
