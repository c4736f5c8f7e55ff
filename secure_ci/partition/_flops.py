"""FLOP estimates per graph node from the shapes seen on the example inputs.

Estimates, not counts: a multiply-add is 2 FLOPs; convolutions, linear layers, matmuls and
attention are counted from their shapes, normalisations as a few FLOPs per element, other
elementwise ops as one FLOP per output element, and view-like ops as free.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional

__all__ = ["node_flops"]

_FREE_NAMES = frozenset(
    {
        "view",
        "reshape",
        "flatten",
        "permute",
        "transpose",
        "contiguous",
        "unsqueeze",
        "squeeze",
        "expand",
        "size",
        "getitem",
        "getattr",
        "chunk",
        "split",
        "unbind",
        "t",
        "to",
        "type_as",
        "detach",
        "dim",
        "cat",
        "stack",
        "identity",
    }
)
_NORM_MODULES = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_FREE_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout)


def _numel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, tuple | list):
        return sum(_numel(v) for v in value)
    return 0


def _conv(out: Any, weight: torch.Tensor) -> int:
    # weight: (out_channels, in_channels / groups, *kernel)
    return 2 * _numel(out) * math.prod(weight.shape[1:])


def _matmul(args: tuple[Any, ...], out: Any) -> int:
    first = args[0] if args else None
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        return _numel(out)
    return 2 * _numel(out) * first.shape[-1]


def _sdpa(args: tuple[Any, ...], out: Any) -> int:
    query, key = args[0], args[1]
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
        return _numel(out)
    # QK^T and attn @ V: 2 * 2 * (batch*heads) * L * S * E
    return 4 * query.numel() * key.shape[-2]


def _module_flops(module: nn.Module, args: tuple[Any, ...], out: Any) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return _conv(out, module.weight)
    if isinstance(module, nn.Linear):
        return 2 * _numel(out) * module.in_features
    if isinstance(module, _NORM_MODULES):
        return 5 * _numel(out)
    if isinstance(module, _FREE_MODULES):
        return 0
    if isinstance(module, nn.modules.pooling._AdaptiveAvgPoolNd | nn.modules.pooling._AvgPoolNd):
        return _numel(args[0]) if args else _numel(out)
    if isinstance(module, nn.modules.pooling._MaxPoolNd | nn.Softmax):
        return _numel(args[0]) if args else _numel(out)
    return _numel(out)


_FUNCTION_FLOPS: dict[Callable[..., Any], Callable[[tuple[Any, ...], Any], int]] = {
    torch.matmul: _matmul,
    operator.matmul: _matmul,
    torch.bmm: _matmul,
    torch.mm: _matmul,
    torch.einsum: lambda args, out: 2 * _numel(out),
    functional.linear: lambda args, out: 2 * _numel(out) * args[1].shape[-1],
    functional.conv1d: lambda args, out: _conv(out, args[1]),
    functional.conv2d: lambda args, out: _conv(out, args[1]),
    functional.conv3d: lambda args, out: _conv(out, args[1]),
    functional.scaled_dot_product_attention: _sdpa,
    functional.softmax: lambda args, out: 5 * _numel(out),
    torch.softmax: lambda args, out: 5 * _numel(out),
    functional.layer_norm: lambda args, out: 5 * _numel(out),
    functional.batch_norm: lambda args, out: 5 * _numel(out),
}


_ATEN_FLOPS: dict[str, Callable[[tuple[Any, ...], Any], int]] = {
    "linear": _FUNCTION_FLOPS[functional.linear],
    "addmm": lambda args, out: 2 * _numel(out) * args[1].shape[-1],
    "mm": _matmul,
    "bmm": _matmul,
    "matmul": _matmul,
    "conv1d": _FUNCTION_FLOPS[functional.conv1d],
    "conv2d": _FUNCTION_FLOPS[functional.conv2d],
    "conv3d": _FUNCTION_FLOPS[functional.conv3d],
    "convolution": _FUNCTION_FLOPS[functional.conv2d],
    "scaled_dot_product_attention": _sdpa,
    "softmax": _FUNCTION_FLOPS[torch.softmax],
    "_softmax": _FUNCTION_FLOPS[torch.softmax],
    "layer_norm": _FUNCTION_FLOPS[functional.layer_norm],
    "batch_norm": _FUNCTION_FLOPS[functional.batch_norm],
}


def node_flops(op: str, target: Any, args: tuple[Any, ...], out: Any, module: Any) -> int:
    """Estimated FLOPs of one executed node (``module`` is the submodule for call_module)."""
    if op == "call_module" and isinstance(module, nn.Module):
        return _module_flops(module, args, out)
    if op == "call_function":
        packet = getattr(target, "overloadpacket", None)  # an aten op from torch.export
        name = getattr(packet if packet is not None else target, "__name__", "")
        estimate = _ATEN_FLOPS.get(name) if packet is not None else _FUNCTION_FLOPS.get(target)
        if estimate is not None:
            return estimate(args, out)
    elif op == "call_method":
        if target in ("matmul", "bmm", "mm"):
            return _matmul(args, out)
        if target == "softmax":
            return 5 * _numel(out)
        name = str(target)
    else:
        return 0
    return 0 if name in _FREE_NAMES else _numel(out)
