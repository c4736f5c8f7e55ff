"""The fast path of the int8/int4 encoders: fbgemm's fused rowwise quantizers.

``torch.ops.quantized.embedding_bag_byte_prepack`` / ``embedding_bag_4bit_prepack`` quantize
each row of a 2-D float32 tensor in one pass that stays in cache (row minimum and maximum,
then the codes), writing ``[codes][scale][bias]`` per row. With one row per channel that is
wire format v1 once the parameters are moved in front: ``x ~= bias + code * scale``.

- int8: float32 scale ``range / 255`` and bias ``min`` (the parameters flag says float32),
  codes rounded to nearest against them. fbgemm divides by ``range + 1e-8``, which shifts
  codes of very narrow channels: a non-constant channel narrower than ``_MIN_RANGE`` goes to
  the generic path.
- int4: float16 bias ``min`` and scale ``(max - bias) / 15``, codes rounded against the
  float16 values, two a byte with the even index in the low nibble: per row, so only rows of
  even length match the format's global packing. A range too small for a float16 scale
  (which the kernel writes as 1.0) goes to the generic path, which keeps it in float32, and
  so does a channel whose float16 bias rounds above its maximum (a negative scale).

Used only where it is exactly the format: one batch row (channel-major is row-major), rows of
at least ``FUSED_MIN_REST`` values (parameters cost next to nothing), finite values (one
``isfinite`` pass: the kernels' vector min/max can drop a NaN), a little-endian host, and a
torch build that has the kernels (probed once). Anything else returns None and the generic
vectorised path encodes it, or refuses it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["FUSED_MIN_REST", "quantize_fused"]

FUSED_MIN_REST = 512
_MIN_RANGE = 1e-3  # fbgemm's epsilon moves int8 codes by < 0.003 of a step above this range
_F16_TINY = float(np.finfo(np.float16).smallest_subnormal)
_Kernel = Callable[[torch.Tensor], torch.Tensor]


@functools.cache
def _kernels() -> tuple[_Kernel, _Kernel] | None:
    if sys.byteorder != "little":  # the kernels write native float32/float16 parameters
        return None
    try:
        ops: Any = torch.ops.quantized
        byte, nibble = ops.embedding_bag_byte_prepack, ops.embedding_bag_4bit_prepack
        probe = torch.zeros(1, 8)
        byte(probe)
        nibble(probe)
    except (AttributeError, RuntimeError):
        return None
    return byte, nibble


def _lost_tiny_range(rows: torch.Tensor, scales: np.ndarray[Any, Any]) -> bool:
    """True when a channel's range was too small for a float16 scale: the 4-bit kernel then
    writes scale 1.0, as for a constant channel; the generic path keeps such a channel with
    float32 parameters. Only rows with scale 1.0 are looked at."""
    ones = np.flatnonzero(scales == 1.0)
    if not ones.size:
        return False
    picked = rows[torch.from_numpy(ones)]
    span = (picked.amax(dim=1) - picked.amin(dim=1)).numpy()
    return bool(((span > 0) & (span < 15 * _F16_TINY)).any())


def quantize_fused(rows: torch.Tensor, qmax: int) -> tuple[int, list[bytes | memoryview]] | None:
    """``(flags, [params, codes])`` of a ``(channels, rest)`` float32 tensor, or None where
    the fused kernels do not give exactly the format (the caller then takes the generic path,
    which also refuses what cannot be encoded)."""
    kernels = _kernels()
    rest = rows.shape[1]
    if kernels is None or rest < FUSED_MIN_REST or (qmax == 15 and rest % 2):
        return None
    # the kernels' vector min/max may drop a NaN: check first (the generic path refuses it)
    if not np.isfinite(rows.numpy()).all():
        return None
    if qmax == 255:
        packed = kernels[0](rows).numpy()
        params = np.ascontiguousarray(packed[:, rest:]).view(np.float32)
        span = params[:, 0] * 255  # the channel's max - min, as float32
        if ((span > 0) & (span < _MIN_RANGE)).any():
            return None
        codes = packed[:, :rest]
        flags = 1  # float32 parameters
    else:
        packed = kernels[1](rows).numpy()
        params = np.ascontiguousarray(packed[:, rest // 2 :]).view(np.float16)
        if _lost_tiny_range(rows, params[:, 0]):
            return None
        codes = packed[:, : rest // 2]
        flags = 0
    # float16 parameters can overflow, and a bias rounded above every value of its channel
    # gives a negative scale: the format (and our decoder) wants finite, scale >= 0
    if not (np.isfinite(params).all() and (params[:, 0] >= 0).all()):
        return None
    wire = params.T.tobytes()  # (channels, [scale, bias]) -> scales, then zeros
    return flags, [wire, np.ascontiguousarray(codes).reshape(-1).data]
