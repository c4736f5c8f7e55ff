"""Every zoo model traces, and every one of its cuts splits into an exact head and tail."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from secure_ci import zoo
from secure_ci.exceptions import ConfigError
from secure_ci.partition import Partitioner


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Other test processes share the two cores: spinning intra-op threads only slow us down.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.names())
def test_every_cut_of_every_zoo_model_is_exact(name: str) -> None:
    entry = zoo.get(name)
    assert entry.name == name
    torch.manual_seed(0)
    model = entry.build()
    partitioner = Partitioner(model, (torch.randn(entry.input_shape),))
    assert len(partitioner.cuts) >= 5
    x = torch.randn(3, *entry.input_shape[1:])  # another batch size than the example
    with torch.no_grad():
        expected = model(x)
        for cut in partitioner.cuts:
            head, tail = partitioner.split(cut.index)
            torch.testing.assert_close(tail(*head(x)), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "min_multi"), [("resnet18", 8), ("mobilenet_v2", 5), ("transformer_encoder", 4)]
)
def test_skip_connections_give_multi_tensor_cuts(name: str, min_multi: int) -> None:
    entry = zoo.get(name)
    partitioner = Partitioner(entry.build(), (torch.randn(entry.input_shape),))
    assert sum(len(cut.boundary) > 1 for cut in partitioner.cuts) >= min_multi
    assert any(cut.bottleneck for cut in partitioner.cuts)


def test_registry() -> None:
    assert zoo.names() == ("digits_cnn", "mobilenet_v2", "resnet18", "transformer_encoder")
    assert zoo.get("resnet18").input_shape == (1, 3, 32, 32)
    assert zoo.get("digits_cnn").input_shape == (1, 1, 32, 32)
    with pytest.raises(ConfigError, match="unknown zoo model 'vgg'"):
        zoo.get("vgg")


def test_width_parameters_scale_the_models() -> None:
    def params(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    assert params(zoo.resnet18(width=32)) > 3 * params(zoo.resnet18(width=16))
    assert params(zoo.mobilenet_v2(width_mult=1.0)) > params(zoo.mobilenet_v2(width_mult=0.5))
    assert params(zoo.transformer_encoder(dim=64)) > params(zoo.transformer_encoder(dim=32))
    with pytest.raises(ValueError, match="divide"):
        zoo.transformer_encoder(dim=30, heads=4)
