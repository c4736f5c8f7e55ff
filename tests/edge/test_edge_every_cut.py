"""Every cut servable: each cut of each zoo model (and a model with two inputs) through a real
edge, compared with local inference of the whole model.

The transformer's cuts after a ``permute`` carry a boundary tensor whose batch is dimension 1:
those are batched along it. Devices pipeline two requests per cut, so tails run batched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import nn

from secure_ci.device import DeviceIdentity, open_session
from secure_ci.edge import EdgeConfig, EdgeLimits, ModelRegistry, TailEntry, open_edge
from secure_ci.partition import Partitioner, PartitionPlan
from secure_ci.testing import DEV_NOW, DevEnclave, dev_enclave
from secure_ci.zoo import get, names

CODEC = "float32"  # lossless: the edge's output must equal local inference


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _split_every_cut(partitioner: Partitioner) -> tuple[dict[int, nn.Module], list[TailEntry]]:
    heads, tails = {}, []
    model_id = bytes.fromhex(partitioner.model_id)
    for cut in partitioner.cuts:
        head, tail = partitioner.split(cut)
        heads[cut.index] = head
        tails.append(TailEntry.build(model_id, cut.index, tail, cut.boundary, frozenset({CODEC})))
    return heads, tails


async def _serve_and_compare(
    partitioners: Sequence[Partitioner], samples: dict[str, list[tuple[torch.Tensor, ...]]]
) -> dict[str, int]:
    """Serve every cut of every partitioner on one edge; per model, how many cuts matched."""
    enclave: DevEnclave = dev_enclave(DEV_NOW)
    identity = DeviceIdentity.generate()
    models = ModelRegistry()
    heads: dict[str, dict[int, nn.Module]] = {}
    for p in partitioners:
        heads[p.model_id], tails = _split_every_cut(p)
        for tail in tails:
            models.add(tail)
    config = EdgeConfig(
        limits=EdgeLimits(max_batch=4), allowed_devices=frozenset({identity.address})
    )
    matched: dict[str, int] = {}
    async with open_edge(
        config, provider=enclave.provider, models=models, clock=lambda: float(DEV_NOW)
    ) as edge:
        for p in partitioners:
            with torch.no_grad():
                expected = [p.model(*x) for x in samples[p.model_id]]
            for cut, head in heads[p.model_id].items():
                async with open_session(
                    f"127.0.0.1:{edge.port}",
                    policy=enclave.policy,
                    collateral=enclave.collateral,
                    identity=identity,
                    model=head,
                    plan=PartitionPlan(p.model_id, cut, CODEC),
                    clock=lambda: float(DEV_NOW),
                    timeout=60.0,
                ) as session:
                    xs = [x if len(x) > 1 else x[0] for x in samples[p.model_id]]
                    outputs = await session.infer_many(xs, max_in_flight=len(xs))
                for got, want in zip(outputs, expected, strict=True):
                    torch.testing.assert_close(
                        got, want, atol=1e-4, rtol=1e-4, msg=lambda m, c=cut: f"cut {c}: {m}"
                    )
                matched[p.model_id] = matched.get(p.model_id, 0) + 1
        assert edge.stats["task_errors"] == 0
    return matched


def _zoo(name: str) -> Partitioner:
    entry = get(name)
    torch.manual_seed(0)
    return Partitioner(entry.build(), (torch.zeros(entry.input_shape),))


@pytest.mark.slow
async def test_every_cut_of_every_zoo_model_is_served_and_matches_local_inference() -> None:
    partitioners = [_zoo(name) for name in names()]
    generator = torch.Generator().manual_seed(3)
    samples = {
        p.model_id: [
            tuple(torch.randn(s.shape, generator=generator) for s in p.input_specs)
            for _ in range(2)
        ]
        for p in partitioners
    }
    transformer = next(p for p in partitioners if type(p.model).__name__ == "TransformerEncoder")
    moved = [c for c in transformer.cuts if any(s.batch_dim != 0 for s in c.boundary)]
    assert len(moved) == 6  # after the permutes: served, batched along dimension 1
    matched = await _serve_and_compare(partitioners, samples)
    assert matched == {p.model_id: len(p.cuts) for p in partitioners}


class TwoInputs(nn.Module):
    """Two inputs, mixed after the first layer: the head takes both."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Conv2d(1, 4, 3, padding=1)
        self.extra = nn.Linear(5, 4)
        self.out = nn.Linear(4 * 8 * 8, 3)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.image(image)) + self.extra(extra)[:, :, None, None]
        result: torch.Tensor = self.out(h.flatten(1))
        return result


async def test_a_model_with_two_inputs_is_split_from_the_device_library() -> None:
    torch.manual_seed(0)
    partitioner = Partitioner(TwoInputs(), (torch.zeros(1, 1, 8, 8), torch.zeros(1, 5)))
    assert len(partitioner.input_specs) == 2
    generator = torch.Generator().manual_seed(4)
    samples = {
        partitioner.model_id: [
            (torch.randn(1, 1, 8, 8, generator=generator), torch.randn(1, 5, generator=generator))
            for _ in range(3)
        ]
    }
    matched = await _serve_and_compare([partitioner], samples)
    assert matched == {partitioner.model_id: len(partitioner.cuts)}


class BatchMixing(nn.Module):
    """Its output depends on the whole batch: no cut may batch requests of several devices."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.last = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        result: torch.Tensor = self.last(h * torch.tanh(h.sum()))
        return result


async def test_cuts_that_cannot_batch_are_served_one_request_at_a_time() -> None:
    torch.manual_seed(0)
    partitioner = Partitioner(BatchMixing(), (torch.zeros(1, 6),))
    _, tails = _split_every_cut(partitioner)
    batchable = {c.name: t.batchable for c, t in zip(partitioner.cuts, tails, strict=True)}
    # before the batch is mixed in, no cut batches (the first by the probe, then by a boundary
    # scalar); once the head has mixed it, the rest of the model batches again
    assert batchable == {"first": False, "sum_1": False, "tanh": False, "mul": True}
    generator = torch.Generator().manual_seed(6)
    samples = {partitioner.model_id: [(torch.randn(1, 6, generator=generator),) for _ in range(3)]}
    matched = await _serve_and_compare([partitioner], samples)
    assert matched == {partitioner.model_id: len(partitioner.cuts)}
