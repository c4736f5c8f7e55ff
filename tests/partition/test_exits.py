"""Early exits: confidence policy, exit heads, and training them on a frozen backbone."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from secure_ci.exceptions import PartitionError
from secure_ci.partition import (
    ExitHead,
    ExitPolicy,
    Partitioner,
    TensorSpec,
    attach_exit,
    should_exit,
    train_exit_heads,
)
from secure_ci.partition._exits import exit_confidence


def test_max_softmax_policy() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    policy = ExitPolicy(cut=0, metric="max_softmax", threshold=0.9)
    assert should_exit(logits, policy).tolist() == [True, False]
    confidence = exit_confidence(logits, "max_softmax")
    assert confidence[1].item() == pytest.approx(1 / 3)


def test_entropy_policy() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    entropy = exit_confidence(logits, "entropy")
    assert entropy[1].item() == pytest.approx(math.log(3), rel=1e-5)
    policy = ExitPolicy(cut=0, metric="entropy", threshold=0.1)
    assert should_exit(logits, policy).tolist() == [True, False]


@pytest.mark.parametrize(
    "logits",
    [torch.zeros(3), torch.zeros(2, 1), torch.zeros(2, 3, dtype=torch.int64), "logits"],
)
def test_bad_logits_are_refused(logits: object) -> None:
    policy = ExitPolicy(cut=0, metric="max_softmax", threshold=0.5)
    with pytest.raises(PartitionError, match="logits"):
        should_exit(logits, policy)  # type: ignore[arg-type]


def test_exit_head_pools_every_boundary_kind() -> None:
    specs = (
        TensorSpec((1, 3, 8, 8), "float32"),
        TensorSpec((1, 5, 6), "float32"),
        TensorSpec((1, 7), "float16"),
    )
    head = ExitHead(specs, 4, pool=2)
    assert head.linear.in_features == 3 * 2 * 2 + 6 + 7
    logits = head(torch.randn(2, 3, 8, 8), torch.randn(2, 5, 6), torch.randn(2, 7).half())
    assert logits.shape == (2, 4)
    assert head.flops == 2 * 25 * 4 + 3 * 64 + 30 + 7
    with pytest.raises(PartitionError, match="expects 3"):
        head(torch.randn(2, 3, 8, 8))
    with pytest.raises(PartitionError, match="shape"):
        head(torch.randn(2, 3, 9, 8), torch.randn(2, 5, 6), torch.randn(2, 7))


@pytest.mark.parametrize(
    ("specs", "classes"),
    [
        ((TensorSpec((1, 2, 2, 2, 2), "float32"),), 3),
        ((TensorSpec((1, 4), "int64"),), 3),
        ((), 3),
        ((TensorSpec((1, 4), "float32"),), 1),
    ],
)
def test_exit_head_refuses_what_it_cannot_classify(
    specs: tuple[TensorSpec, ...], classes: int
) -> None:
    with pytest.raises(PartitionError):
        ExitHead(specs, classes)


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))  # type: ignore[no-any-return]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 2, (96,), generator=generator)
    images = torch.randn(96, 1, 8, 8, generator=generator) * 0.3
    images[:, :, :4] += labels.view(-1, 1, 1, 1).float() * 2 - 1  # class = top-half brightness
    return images, labels


def test_train_exit_heads_is_deterministic_and_leaves_the_backbone_alone() -> None:
    torch.manual_seed(0)
    backbone = _Backbone()
    partitioner = Partitioner(backbone, (torch.zeros(1, 1, 8, 8),))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    cut = next(c for c in partitioner.cuts if c.name == "act")
    first = train_exit_heads(backbone, partitioner, [cut], _data(), epochs=15, seed=1)
    second = train_exit_heads(backbone, partitioner, [cut.index], _data(), epochs=15, seed=1)
    assert set(first) == {cut.index}
    for name, value in first[cut.index].state_dict().items():
        assert torch.equal(value, second[cut.index].state_dict()[name])
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(p.requires_grad for p in backbone.parameters())
    head, _ = partitioner.split(cut)
    with_exit = attach_exit(head, first[cut.index])
    images, labels = _data()
    boundary, logits = with_exit(images)
    assert boundary[0].shape == (96, 4, 8, 8)
    assert float((logits.argmax(dim=1) == labels).float().mean()) >= 0.95


def test_train_exit_heads_validates_its_data() -> None:
    backbone = _Backbone()
    partitioner = Partitioner(backbone, (torch.zeros(1, 1, 8, 8),))
    images, labels = _data()
    with pytest.raises(PartitionError, match="same length"):
        train_exit_heads(backbone, partitioner, [0], (images, labels[:5]), epochs=1)
    with pytest.raises(PartitionError, match="positive"):
        train_exit_heads(backbone, partitioner, [0], (images, labels), epochs=0)
    with pytest.raises(PartitionError):
        attach_exit("head", ExitHead((TensorSpec((1, 4), "float32"),), 2))  # type: ignore[arg-type]
