"""Early exits: small classifiers on a cut's boundary that let confident samples stop early.

An :class:`ExitHead` pools each boundary tensor and applies one linear layer. The device runs
the head of the split plus the exit head; when :func:`should_exit` says the exit is confident
enough (policy from :class:`~secure_ci.partition._plan.ExitPolicy`) the sample never needs the
rest of the model. :func:`train_exit_heads` fits exit heads on a frozen backbone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from secure_ci.exceptions import PartitionError
from secure_ci.partition._guard import running
from secure_ci.partition._plan import Cut, ExitPolicy, TensorSpec

__all__ = ["ExitHead", "HeadWithExit", "attach_exit", "should_exit", "train_exit_heads"]


class _Splitter(Protocol):
    @property
    def cuts(self) -> tuple[Cut, ...]: ...

    def split(self, cut: Cut | int) -> tuple[nn.Module, nn.Module]: ...


class ExitHead(nn.Module):
    """Pooling + linear classifier over the boundary tensors of one cut.

    4-D tensors (N, C, H, W) are average-pooled to ``pool`` x ``pool``, 3-D tensors (N, T, D)
    are averaged over T, 2-D tensors are used as they are; the results are concatenated.
    """

    def __init__(self, boundary: Sequence[TensorSpec], num_classes: int, *, pool: int = 4):
        super().__init__()
        if not boundary or num_classes < 2 or pool < 1:
            raise PartitionError("an exit head needs a boundary, >= 2 classes and pool >= 1")
        features = 0
        for spec in boundary:
            if spec.dtype not in ("float16", "bfloat16", "float32", "float64"):
                raise PartitionError(f"exit heads need float boundaries, got {spec.dtype}")
            if len(spec.shape) == 4:
                features += spec.shape[1] * min(pool, spec.shape[2]) * min(pool, spec.shape[3])
            elif len(spec.shape) in (2, 3):
                features += spec.shape[-1]
            else:
                raise PartitionError(f"no exit head for a boundary of shape {spec.shape}")
        self.boundary = tuple(boundary)
        self.pool = pool
        self.linear = nn.Linear(features, num_classes)

    def features(self, *tensors: torch.Tensor) -> torch.Tensor:
        """The pooled, flattened, concatenated boundary (what the linear layer sees)."""
        if len(tensors) != len(self.boundary):
            raise PartitionError(f"exit head expects {len(self.boundary)} tensors")
        parts = []
        for tensor, spec in zip(tensors, self.boundary, strict=True):
            if tensor.dim() != len(spec.shape) or tuple(tensor.shape[1:]) != spec.shape[1:]:
                raise PartitionError(
                    f"exit head input of shape {tuple(tensor.shape)}, expected {spec.shape}"
                )
            value = tensor.float()
            if value.dim() == 4:
                size = (min(self.pool, spec.shape[2]), min(self.pool, spec.shape[3]))
                value = F.adaptive_avg_pool2d(value, size)
            elif value.dim() == 3:
                value = value.mean(dim=1)
            parts.append(value.flatten(1))
        return torch.cat(parts, dim=1)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(*tensors))  # type: ignore[no-any-return]

    @property
    def flops(self) -> int:
        """FLOPs per sample, counted as the partitioner does: 2 per multiply-add."""
        pooled = sum(math.prod(spec.shape[1:]) for spec in self.boundary)
        return 2 * self.linear.in_features * self.linear.out_features + pooled


class HeadWithExit(nn.Module):
    """A split's head plus an exit head: ``forward(*x) -> (boundary, exit_logits)``."""

    def __init__(self, head: nn.Module, exit_head: ExitHead) -> None:
        super().__init__()
        self.head = head
        self.exit_head = exit_head

    def forward(self, *inputs: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        boundary = self.head(*inputs)
        boundary = tuple(boundary) if isinstance(boundary, tuple | list) else (boundary,)
        return boundary, self.exit_head(*boundary)


def attach_exit(head: nn.Module, exit_head: ExitHead) -> HeadWithExit:
    """Run ``exit_head`` on the boundary that ``head`` (from ``Partitioner.split``) produces."""
    if not isinstance(head, nn.Module) or not isinstance(exit_head, ExitHead):
        raise PartitionError("attach_exit needs a head module and an ExitHead")
    return HeadWithExit(head, exit_head)


def exit_confidence(logits: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-sample max softmax probability, or prediction entropy in nats."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
        raise PartitionError("exit logits must be a (batch, classes >= 2) tensor")
    if not logits.is_floating_point():
        raise PartitionError(f"exit logits must be floating point, got {logits.dtype}")
    log_p = F.log_softmax(logits.float(), dim=1)
    if metric == "max_softmax":
        return log_p.max(dim=1).values.exp()
    if metric == "entropy":
        return -(log_p.exp() * log_p).sum(dim=1)
    raise PartitionError(f"unknown exit metric {metric!r}")


def should_exit(logits: torch.Tensor, policy: ExitPolicy) -> torch.Tensor:
    """Boolean mask of the samples whose exit prediction is confident enough to stop."""
    confidence = exit_confidence(logits, policy.metric)
    if policy.metric == "max_softmax":
        return confidence >= policy.threshold
    return confidence <= policy.threshold


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for ``module``; restored afterwards."""
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def train_exit_heads(
    backbone: nn.Module,
    partitioner: _Splitter,
    cuts: Sequence[Cut | int],
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int = 40,
    seed: int = 0,
    lr: float = 1e-2,
    batch_size: int = 128,
    pool: int = 4,
    num_classes: int | None = None,
) -> dict[int, ExitHead]:
    """Train one exit head per cut on ``data`` = (inputs, labels); the backbone stays frozen.

    Boundaries are computed once with the split heads, then each exit head is fitted with Adam
    on shuffled mini-batches from a seeded generator, so the result is deterministic.
    """
    inputs, labels = data
    if inputs.shape[0] != labels.shape[0] or labels.dim() != 1 or inputs.shape[0] == 0:
        raise PartitionError("exit training data must be (inputs, labels) of the same length")
    if epochs < 1 or batch_size < 1:
        raise PartitionError("epochs and batch_size must be positive")
    classes = num_classes if num_classes is not None else int(labels.max()) + 1
    heads: dict[int, ExitHead] = {}
    with _frozen(backbone), torch.random.fork_rng(devices=[]):
        for item in cuts:
            cut = partitioner.cuts[item] if isinstance(item, int) else item
            split_head, _ = partitioner.split(cut)
            with running(), torch.no_grad():
                boundary = _as_tuple(split_head(inputs))
            torch.manual_seed(seed + cut.index)
            exit_head = ExitHead(cut.boundary, classes, pool=pool)
            with running(), torch.no_grad():
                pooled = exit_head.features(*boundary)
            _fit_linear(exit_head.linear, pooled, labels, epochs, seed, lr, batch_size)
            heads[cut.index] = exit_head.eval()
    return heads


def _as_tuple(value: Any) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (value,)


def _fit_linear(
    linear: nn.Linear,
    features: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    seed: int,
    lr: float,
    batch_size: int,
) -> None:
    mean = features.mean(dim=0)
    std = features.std(dim=0).clamp_min(1e-6)
    # Train on standardised features, then fold the standardisation into the layer.
    standard = nn.Linear(linear.in_features, linear.out_features)
    optimizer = torch.optim.Adam(standard.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    count = features.shape[0]
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            batch = order[start : start + batch_size]
            with running():  # per step: a trace on another thread waits one step at most
                loss = F.cross_entropy(standard((features[batch] - mean) / std), labels[batch])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    with running(), torch.no_grad():
        linear.weight.copy_(standard.weight / std)
        linear.bias.copy_(standard.bias - (standard.weight / std) @ mean)
    if not math.isfinite(float(linear.weight.detach().abs().sum())):
        raise PartitionError("exit head training diverged")
