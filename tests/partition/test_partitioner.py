"""Partitioner: cut enumeration on DAGs, verified splits, and every kind of bad input."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from secure_ci.exceptions import PartitionError
from secure_ci.partition import Partitioner
from secure_ci.partition._partitioner import _bottlenecks
from secure_ci.zoo import resnet18


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Other test processes share the two cores: spinning intra-op threads only slow us down.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_every_split_matches(partitioner: Partitioner, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        expected = partitioner.model(*inputs)
        for cut in partitioner.cuts:
            head, tail = partitioner.split(cut)
            boundary = head(*inputs)
            assert isinstance(boundary, tuple)
            assert len(boundary) == len(cut.boundary)
            for tensor, spec in zip(boundary, cut.boundary, strict=True):
                assert tuple(tensor.shape[1:]) == spec.shape[1:]
            torch.testing.assert_close(tail(*boundary), expected, atol=1e-5, rtol=1e-5)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.l1(x)
        return a + self.l2(torch.relu(a))


def test_residual_cuts_carry_several_tensors() -> None:
    torch.manual_seed(0)
    p = Partitioner(Residual(), (torch.randn(2, 8),))
    assert [c.name for c in p.cuts] == ["l1", "relu", "l2"]
    assert [c.boundary_names for c in p.cuts] == [("l1",), ("l1", "relu"), ("l1", "l2")]
    assert [c.nbytes for c in p.cuts] == [64, 128, 128]
    assert all(c.index == i for i, c in enumerate(p.cuts))
    _assert_every_split_matches(p, torch.randn(2, 8))


class SharedConstants(nn.Module):
    """A parameter and a value computed from parameters alone, used on both sides of cuts."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.weight = nn.Parameter(torch.randn(6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t() * 2.0  # depends on parameters only
        h = torch.relu(x * self.scale)
        h = torch.matmul(h, w)
        return torch.tanh(h) * self.scale + torch.matmul(h, w)


def test_constants_never_cross_the_boundary() -> None:
    torch.manual_seed(1)
    p = Partitioner(SharedConstants(), (torch.randn(3, 6),))
    crossing = {name for c in p.cuts for name in c.boundary_names}
    assert crossing.isdisjoint({"weight", "scale", "t", "mul"})
    assert crossing <= {"x", "mul_1", "relu", "matmul", "tanh", "mul_2", "matmul_1"}
    assert p.cuts[0].head_params_share == pytest.approx(6 / 42)
    _assert_every_split_matches(p, torch.randn(3, 6))


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc(x))
        return h + y, torch.sigmoid(h).sum(dim=1)


def test_several_inputs_and_outputs_and_inputs_crossing() -> None:
    p = Partitioner(TwoInTwoOut(), (torch.randn(2, 4), torch.randn(2, 4)))
    assert p.cuts[0].boundary_names == ("y", "fc")  # the raw input y crosses to the tail
    _assert_every_split_matches(p, torch.randn(5, 4), torch.randn(5, 4))


class SizeDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        y = torch.relu(x)
        return y.reshape(-1, n // 2, 2).sum(dim=2)


def test_cuts_where_python_values_would_cross_are_excluded() -> None:
    p = Partitioner(SizeDependent(), (torch.randn(2, 6),))
    assert p.cuts, "there must remain valid cuts"
    for cut in p.cuts:
        assert all(name not in ("getattr_1", "getitem", "floordiv") for name in cut.boundary_names)
    _assert_every_split_matches(p, torch.randn(2, 6))


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        b = functional.relu(a, inplace=True)
        return a + b


def test_in_place_ops_split_correctly() -> None:
    p = Partitioner(InPlace(), (torch.randn(1, 2, 5, 5),))
    _assert_every_split_matches(p, torch.randn(1, 2, 5, 5))


def test_bottlenecks_of_a_chain() -> None:
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 64), nn.ReLU()
    )
    p = Partitioner(model, (torch.randn(1, 64),))
    assert [c.nbytes for c in p.cuts] == [256, 256, 32, 32, 256]
    assert [c.bottleneck for c in p.cuts] == [False, False, True, True, False]


def test_bottleneck_marks_plateaus_and_needs_smaller_than_input() -> None:
    assert _bottlenecks([5, 3, 3, 4, 2, 6], input_bytes=10) == [0, 1, 1, 0, 1, 0]
    assert _bottlenecks([5, 3, 3, 4, 2, 6], input_bytes=3) == [0, 0, 0, 0, 1, 0]
    assert _bottlenecks([], input_bytes=3) == []


def test_shares_grow_along_the_cuts() -> None:
    torch.manual_seed(0)
    p = Partitioner(resnet18(width=8), (torch.randn(1, 3, 16, 16),))
    flops = [c.head_flops_share for c in p.cuts]
    params = [c.head_params_share for c in p.cuts]
    assert flops == sorted(flops)
    assert params == sorted(params)
    assert 0 < flops[0] < 0.05
    assert 0.95 < flops[-1] < 1
    assert p.total_flops > 2 * 8 * 3 * 9 * 16 * 16
    assert p.total_params == sum(q.numel() for q in p.model.parameters())
    assert sum(len(c.boundary) > 1 for c in p.cuts) >= 8  # every block carries its shortcut


def test_model_id_is_stable_and_sensitive_to_weights_and_graph() -> None:
    x = torch.randn(1, 3, 8, 8)
    torch.manual_seed(0)
    first = Partitioner(resnet18(width=4), (x,)).model_id
    torch.manual_seed(0)
    model = resnet18(width=4)
    same = Partitioner(model, (torch.randn(2, 3, 4, 4),))  # the example input does not matter
    assert same.model_id == first
    assert len(first) == 64
    assert int(first, 16) >= 0
    torch.manual_seed(1)
    assert Partitioner(resnet18(width=4), (x,)).model_id != first
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert Partitioner(model, (x,)).model_id != first
    model.get_buffer("stem.1.running_mean").fill_(0.5)
    assert Partitioner(model, (x,)).model_id != first
    torch.manual_seed(0)
    assert Partitioner(resnet18(width=4, num_classes=9), (x,)).model_id != first


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


class ToNumpy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(x) * 2)


class ShapeDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] > 1:  # symbolic_trace fails here; torch.export specialises
            x = x * len(x)
        h = torch.relu(self.fc(x))
        return h + x, h.sum()


def test_shape_dependent_models_fall_back_to_torch_export() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3)
    p = Partitioner(ShapeDependent(), (x,))
    assert [c.name for c in p.cuts] == ["mul", "linear", "relu", "add"]
    assert p.cuts[1].boundary_names == ("mul", "linear")
    assert p.cuts[1].head_flops_share > 0.5  # aten.linear is counted
    _assert_every_split_matches(p, torch.randn(2, 3))
    head, _ = p.split(0)
    # the exported graph is specialised to the example: another batch size is refused
    with pytest.raises(PartitionError, match=r"expected \(2, 3\)"):
        head(torch.randn(1, 3))


def test_exported_graphs_have_no_batch_dimension() -> None:
    p = Partitioner(ShapeDependent(), (torch.randn(2, 3),))
    assert p.input_specs[0].batch_dim is None
    assert all(s.batch_dim is None for c in p.cuts for s in c.boundary)


class Permuted(nn.Module):
    """The batch moves to dimension 1, and a batch statistic has no batch dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.permute(1, 0, 2) * 2
        total = x.sum()
        return h.permute(1, 0, 2) + total


def test_boundary_specs_say_which_dimension_is_the_batch() -> None:
    p = Partitioner(Permuted(), (torch.randn(1, 3, 4),))
    assert p.input_specs[0].batch_dim == 0
    dims = {c.name: [(s.shape, s.batch_dim) for s in c.boundary] for c in p.cuts}
    assert dims["permute"] == [((1, 3, 4), 0), ((3, 1, 4), 1)]
    assert ((), None) in dims["sum_1"]
    assert Partitioner(Residual(), (torch.randn(2, 8),)).cuts[0].boundary[0].batch_dim == 0


class Random(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (DataDependent(), r"cannot trace DataDependent .*`if x\.sum\(\) > 0:`.*torch\.export"),
        (ToNumpy(), r"cannot trace ToNumpy .*np\.asarray\(x\)"),
        (Random(), "does not reproduce"),
    ],
)
def test_untraceable_models_raise(model: nn.Module, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        Partitioner(model, (torch.randn(2, 3),))


def test_bad_models_and_inputs() -> None:
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(PartitionError, match=r"nn\.Module"):
        Partitioner(lambda t: t, (x,))  # type: ignore[arg-type]
    for inputs in ([x], (), (x, "y"), x):
        with pytest.raises(PartitionError, match="non-empty tuple of tensors"):
            Partitioner(resnet18(width=8), inputs)  # type: ignore[arg-type]
    with pytest.raises(PartitionError, match="takes 1 inputs, got 2"):
        Partitioner(resnet18(width=8), (x, x))
    with pytest.raises(PartitionError, match=r"op stem_0 .*wrong input shape"):
        Partitioner(resnet18(width=8), (torch.randn(1, 1, 16, 16),))


def test_cut_selection_errors() -> None:
    torch.manual_seed(0)
    p = Partitioner(Residual(), (torch.randn(2, 8),))
    other = Partitioner(TwoInTwoOut(), (torch.randn(2, 4), torch.randn(2, 4)))
    for bad in (len(p.cuts), -1, 10**9):
        with pytest.raises(PartitionError, match="out of range"):
            p.split(bad)
    for wrong_type in ("1", True, 1.0):
        with pytest.raises(PartitionError, match="Cut or an int"):
            p.split(wrong_type)  # type: ignore[arg-type]
    with pytest.raises(PartitionError, match="does not belong"):
        p.split(other.cuts[0])
    assert p.cut(p.cuts[1]) is p.cuts[1]


def test_stages_check_their_inputs() -> None:
    torch.manual_seed(0)
    p = Partitioner(Residual(), (torch.randn(2, 8),))
    head, tail = p.split(1)
    assert len(head(torch.randn(7, 8))) == 2  # the batch dimension is free
    with pytest.raises(
        PartitionError, match=r"head input 0 has shape \(2, 9\), expected \(\*, 8\)"
    ):
        head(torch.randn(2, 9))
    with pytest.raises(PartitionError, match="dtype float64"):
        head(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(PartitionError, match="tail expects 2 tensors, got 1"):
        tail(torch.randn(2, 8))
    with pytest.raises(PartitionError, match="must be a tensor"):
        tail(torch.randn(2, 8), [1.0] * 8)


def test_model_id_depends_on_the_graph_not_only_the_weights() -> None:
    x = torch.randn(1, 4)
    torch.manual_seed(0)
    relu = Partitioner(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (x,))
    torch.manual_seed(0)
    gelu = Partitioner(nn.Sequential(nn.Linear(4, 4), nn.GELU()), (x,))
    assert relu.model_id != gelu.model_id
