"""Vectorised kernels of the int8/int4 feature codecs (per-channel affine quantization).

Wire layout of one quantized tensor (see ``_codec``): per-channel ``scale`` then ``zero``
(float16, or float32 when float16 cannot hold them), then the codes ``q`` in channel-major
order (channel = dim 1; tensors with fewer than 2 dims are one channel), one byte each for
int8, two per byte for int4 (even index in the low nibble, a zero pad nibble if the count is
odd). A value decodes as ``zero + q * scale``.

Speed: every step is one whole-array pass in torch or numpy (no per-channel Python loop).
The encoder works in the tensor's own ``(batch, channel, rest)`` layout and transposes only
the one-byte codes; the decoder does the same in reverse. Non-finite inputs are caught from
the per-channel minimum and maximum (both propagate NaN and infinity), not by another pass.
Large single-row tensors take fbgemm's fused rowwise kernels where they give exactly this
format (``_fused``); decoding always takes the one deterministic path below.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from secure_ci.exceptions import CodecError
from secure_ci.partition._fused import quantize_fused

__all__ = ["F32_PARAMS", "dequantize", "pack_nibbles", "quantize", "unpack_nibbles"]

F32_PARAMS = 0x01
_F16_MAX = float(np.finfo(np.float16).max)
_F16_TINY = float(np.finfo(np.float16).smallest_subnormal)
_F32_MAX = float(np.finfo(np.float32).max)
_SAFE = 0.5 * _F32_MAX  # below this, |zero| + 255 * scale cannot overflow float32
_RANGE_MAX = _F32_MAX * (1 - 2**-20)  # widest channel range whose codes decode finitely


def _layout(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(batch, channels, rest) of a shape: channel = dim 1, or one channel below 2 dims."""
    if len(shape) < 2:
        return 1, 1, math.prod(shape)
    lead, channels = shape[0], shape[1]
    return lead, channels, math.prod(shape[2:])


def quantize(values: torch.Tensor, qmax: int) -> tuple[int, list[bytes | memoryview]]:
    """``(flags, [params, codes])`` for a contiguous float32 tensor, codes in [0, qmax]."""
    lead, channels, rest = _layout(tuple(values.shape))
    if values.numel() == 0:
        return 0, [np.zeros(2 * channels, "<f2").tobytes()]
    cube = values.reshape(lead, channels, rest)
    if lead == 1:
        fused = quantize_fused(cube.view(channels, rest), qmax)
        if fused is not None:
            return fused
    lo, _, zero, step = _ranges(cube, qmax)
    widest, narrowest = float(step.max()), float(step.min())
    fits = max(widest, -float(lo.min()), float(lo.max())) <= _F16_MAX  # steps and |zeros|
    if fits and narrowest < _F16_TINY:  # a float16 step would round a tiny range away
        fits = not ((step > 0) & (step < _F16_TINY)).any()
    # the 0.5 of rounding folds into the zero point unless that zero point is so much larger
    # than the step that float32 would round the 0.5 away (then one more pass adds it)
    folded = fits and narrowest >= _F16_TINY and float(abs(zero).max()) < 2**20 * narrowest
    params, shift, scale = _coefficients(zero, step, folded, fits)
    work = torch.sub(cube, shift).mul_(scale)
    if not folded:
        work.add_(0.5)
    work.clamp_(0.0, float(qmax))
    codes = work.numpy().astype(np.uint8)
    if lead > 1:
        codes = np.ascontiguousarray(codes.transpose(1, 0, 2))
    flat = codes.reshape(-1)
    wire = params.astype(params.dtype.newbyteorder("<"), copy=False).tobytes()
    payload = (flat if qmax == 255 else pack_nibbles(flat)).data
    return 0 if fits else F32_PARAMS, [wire, payload]


def _ranges(cube: torch.Tensor, qmax: int) -> tuple[np.ndarray[Any, Any], ...]:
    """``(lo, hi, zero, step)`` per channel: float32 minimum and maximum, float64 zero point
    and step. NaN and infinities propagate through amin/amax, so checking lo and hi is
    enough (no extra pass); a range wider than float32 could never decode.

    The arithmetic here and below is on arrays of one value a channel, where every numpy
    call costs more than its work: it sticks to operators and ufuncs, and the common case
    takes the shortest path.
    """
    lo = cube.amin(dim=(0, 2)).numpy()
    hi = cube.amax(dim=(0, 2)).numpy()
    if not (-math.inf < float(lo.min()) and float(hi.max()) < math.inf):  # False for NaN
        raise CodecError("quantized codecs cannot encode non-finite values")
    zero = lo.astype(np.float64)
    step = hi - zero
    step /= qmax
    if float(step.max()) * qmax > _RANGE_MAX:  # q * scale would overflow when decoded
        raise CodecError("a channel's value range exceeds float32: cannot quantize it")
    return lo, hi, zero, step


def _coefficients(
    zero: np.ndarray[Any, Any], step: np.ndarray[Any, Any], folded: bool, fits: bool
) -> tuple[np.ndarray[Any, Any], torch.Tensor, torch.Tensor]:
    """``(params, shift, scale)``: the wire's per-channel steps then zeros (float16 when they
    ``fits``, else float32), and the float32 ``(channels, 1)`` coefficients that quantize
    against them: ``code = trunc(clamp((x - shift) * scale [+ 0.5]))``, i.e. (x - zero) /
    step rounded half up. ``folded``: every step is positive and small next to its zero
    point, the 0.5 is in ``shift = zero - step / 2`` and no guard is needed. Otherwise
    ``shift`` is the zero point, the caller adds the 0.5, and a zero step (constant channel)
    gets scale 0: every code is 0, and it decodes to the zero point.
    """
    channels = zero.size
    params = np.concatenate((step, zero)).astype(np.float16 if fits else np.float32)
    seen = params.astype(np.float64)
    step, zero = seen[:channels], seen[channels:]
    if folded:
        coef = np.concatenate((zero - 0.5 * step, 1.0 / step)).astype(np.float32)
    else:
        coef = np.empty(2 * channels, np.float32)
        coef[:channels] = zero
        coef[channels:] = np.minimum(1.0 / np.maximum(step, 1e-300), _F32_MAX)
        coef[channels:][step == 0] = 0.0
    coef = coef.reshape(2, channels, 1)
    return params, torch.from_numpy(coef[0]), torch.from_numpy(coef[1])


def pack_nibbles(codes: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Two 4-bit codes a byte, even index in the low nibble (one 16-bit pass, any byte order)."""
    if codes.size % 2:
        codes = np.concatenate([codes, np.zeros(1, np.uint8)])
    pairs = codes.view("<u2")
    packed: np.ndarray[Any, Any] = (pairs | (pairs >> 4)).astype(np.uint8)
    return packed


def unpack_nibbles(packed: np.ndarray[Any, Any], count: int) -> np.ndarray[Any, Any]:
    """The first ``count`` 4-bit codes of ``packed`` (inverse of :func:`pack_nibbles`)."""
    wide = packed.astype("<u2")
    wide = (wide | (wide << 4)) & 0x0F0F
    codes: np.ndarray[Any, Any] = wide.astype("<u2", copy=False).view(np.uint8)[:count]
    return codes


def dequantize(
    codes: np.ndarray[Any, Any], params: np.ndarray[Any, Any], shape: tuple[int, ...]
) -> torch.Tensor:
    """float32 tensor of ``shape`` (``numel > 0``) from channel-major ``codes`` and ``params``
    (scales then zeros, one per channel).

    Parameters that are not finite, and negative scales, raise CodecError, and so do decoded
    values that overflow float32.
    """
    lead, channels, rest = _layout(shape)
    coef = params.astype(np.float32)  # a writable copy in native byte order
    top = float(abs(coef).max())  # NaN compares False below
    if not (top <= _F32_MAX and coef[:channels].min() >= 0):
        raise CodecError("quantization parameters are not finite and non-negative")
    grid = codes.reshape(channels, lead, rest).transpose(1, 0, 2)
    out = torch.from_numpy(grid.astype(np.float32, order="C"))
    out.mul_(torch.from_numpy(coef[:channels].reshape(channels, 1)))
    out.add_(torch.from_numpy(coef[channels:].reshape(channels, 1)))
    # |value| <= |zero| + 255 * scale <= 256 * top: only hostile parameters need the pass
    if 256.0 * top >= _SAFE and not bool(torch.isfinite(out).all()):
        raise CodecError("dequantized values overflow float32")
    return out.reshape(shape)
