"""One side of a split, as a module that refuses inputs of the wrong shape or dtype."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from secure_ci.exceptions import PartitionError
from secure_ci.partition._plan import TensorSpec
from secure_ci.partition._trace import spec_of

__all__ = ["Stage", "check_inputs"]


class Stage(nn.Module):
    """One side of a split: checks its inputs against the expected specs, then runs the graph.

    Dimensions that follow the batch size (found during analysis) may differ from the
    example; every other dimension and the dtype must match, so malformed features fail
    here with a PartitionError rather than deep inside torch.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        specs: tuple[TensorSpec, ...],
        free_dims: tuple[frozenset[int], ...],
        role: str,
    ) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.specs = specs
        self.free_dims = free_dims
        self.role = role

    def forward(self, *args: Any) -> Any:
        check_inputs(args, self.specs, self.free_dims, self.role)
        return self.graph_module(*args)


def check_inputs(
    args: Sequence[Any],
    specs: tuple[TensorSpec, ...],
    free_dims: tuple[frozenset[int], ...],
    role: str,
) -> None:
    """Raise PartitionError unless ``args`` match ``specs`` outside the batch dimensions."""
    if len(args) != len(specs):
        raise PartitionError(f"{role} expects {len(specs)} tensors, got {len(args)}")
    for i, (arg, spec, free) in enumerate(zip(args, specs, free_dims, strict=True)):
        if not isinstance(arg, torch.Tensor):
            raise PartitionError(f"{role} input {i} must be a tensor, got {type(arg).__name__}")
        got = spec_of(arg)
        if got.dtype != spec.dtype:
            raise PartitionError(f"{role} input {i} has dtype {got.dtype}, expected {spec.dtype}")
        if len(got.shape) != len(spec.shape) or any(
            got.shape[k] != d for k, d in enumerate(spec.shape) if k not in free
        ):
            expected = ", ".join("*" if k in free else str(d) for k, d in enumerate(spec.shape))
            raise PartitionError(f"{role} input {i} has shape {got.shape}, expected ({expected})")
