"""FLOP estimates from shapes, and cut enumeration on random DAGs (property test)."""

from __future__ import annotations

import operator
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional

from secure_ci.partition import Partitioner
from secure_ci.partition._flops import node_flops


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_module_estimates() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(1, 3, 8, 8)
    assert node_flops("call_module", "c", (x,), conv(x), conv) == 2 * 8 * 8 * 8 * 27
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    y = torch.randn(1, 8, 4, 4)
    assert node_flops("call_module", "g", (y,), grouped(y), grouped) == 2 * 8 * 16 * 9
    linear = nn.Linear(16, 4)
    z = torch.randn(2, 16)
    assert node_flops("call_module", "l", (z,), linear(z), linear) == 2 * 2 * 4 * 16
    norm = nn.LayerNorm(16)
    assert node_flops("call_module", "n", (z,), norm(z), norm) == 5 * 32
    assert node_flops("call_module", "i", (z,), z, nn.Identity()) == 0


def test_function_and_method_estimates() -> None:
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    out = torch.matmul(a, b)
    assert node_flops("call_function", torch.matmul, (a, b), out, None) == 2 * 30 * 4
    assert node_flops("call_function", operator.matmul, (a, b), out, None) == 2 * 30 * 4
    assert node_flops("call_method", "bmm", (a, b), out, None) == 2 * 30 * 4
    q = k = v = torch.randn(1, 2, 6, 8)
    attn = functional.scaled_dot_product_attention(q, k, v)
    sdpa = functional.scaled_dot_product_attention
    assert node_flops("call_function", sdpa, (q, k, v), attn, None) == 4 * 96 * 6
    assert node_flops("call_function", operator.add, (a, a), a + a, None) == 24
    assert node_flops("call_method", "reshape", (a, -1), a.reshape(-1), None) == 0
    assert node_flops("call_function", operator.getitem, (a, 0), a[0], None) == 0
    assert node_flops("placeholder", "x", (), a, None) == 0


def test_total_flops_of_a_model() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10)
    )
    p = Partitioner(model, (torch.randn(1, 3, 8, 8),))
    assert p.total_flops == 2 * 512 * 27 + 512 + 2 * 10 * 512
    assert [round(c.head_flops_share, 4) for c in p.cuts] == [
        round(2 * 512 * 27 / p.total_flops, 4),
        round((2 * 512 * 27 + 512) / p.total_flops, 4),
        round((2 * 512 * 27 + 512) / p.total_flops, 4),
    ]


class RandomDag(nn.Module):
    """A model defined by a small program: each step reads one or two earlier values."""

    def __init__(self, program: list[tuple[str, int, int]]) -> None:
        super().__init__()
        self.program = program
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in program)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = [x]
        for layer, (op, i, j) in zip(self.layers, self.program, strict=True):
            a, b = values[i % len(values)], values[j % len(values)]
            if op == "linear":
                values.append(layer(a))
            elif op == "relu":
                values.append(torch.relu(a))
            elif op == "add":
                values.append(a + b)
            else:
                values.append(a * torch.tanh(b))
        return values[-1] + values[len(values) // 2]


programs = st.lists(
    st.tuples(
        st.sampled_from(["linear", "relu", "add", "gate"]),
        st.integers(0, 20),
        st.integers(0, 20),
    ),
    min_size=2,
    max_size=10,
)


@settings(max_examples=25)
@given(programs)
def test_every_cut_of_random_dags_is_exact(program: list[tuple[str, int, int]]) -> None:
    torch.manual_seed(0)
    model = RandomDag(program)
    p = Partitioner(model, (torch.randn(2, 4),))
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = model(x)
        for cut in p.cuts:
            assert cut.boundary_names, "every cut carries at least one tensor"
            head, tail = p.split(cut)
            torch.testing.assert_close(tail(*head(x)), expected, atol=1e-5, rtol=1e-5)
