"""profile(): per-cut latency (with a fake clock for exact figures) and its JSON form."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_ci.exceptions import PartitionError
from secure_ci.partition import CutProfile, Partitioner, Profile, profile
from secure_ci.zoo import resnet18


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Other test processes share the two cores: spinning intra-op threads only slow us down.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _partitioner() -> Partitioner:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    return Partitioner(model, (torch.randn(1, 6),))


def test_profile_with_a_fake_clock_is_exact() -> None:
    p = _partitioner()
    ticks = itertools.count()
    result = profile(p, repeats=3, threads=1, batch=2, clock=lambda: next(ticks) * 0.002)
    assert result.model_id == p.model_id
    assert (result.threads, result.batch, result.repeats) == (1, 2, 3)
    assert result.full_ms == pytest.approx(2.0)
    assert len(result.cuts) == len(p.cuts)
    for measured, cut in zip(result.cuts, p.cuts, strict=True):
        assert (measured.index, measured.name) == (cut.index, cut.name)
        assert measured.head_ms == pytest.approx(2.0)
        assert measured.tail_ms == pytest.approx(2.0)
        assert measured.nbytes == 2 * cut.nbytes  # batch of two


def test_profile_real_clock_and_thread_count_restored() -> None:
    torch.manual_seed(0)
    p = Partitioner(resnet18(width=4), (torch.randn(1, 3, 8, 8),))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = profile(p, repeats=1, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert result.full_ms > 0
    assert all(c.head_ms > 0 and c.tail_ms > 0 for c in result.cuts)


@pytest.mark.parametrize(
    "kwargs", [{"repeats": 0}, {"threads": 0}, {"batch": 0}, {"repeats": True}, {"batch": 1.5}]
)
def test_profile_rejects_bad_parameters(kwargs: dict[str, object]) -> None:
    with pytest.raises(PartitionError):
        profile(_partitioner(), **kwargs)  # type: ignore[arg-type]


def _sample() -> Profile:
    cuts = (CutProfile(0, "conv", 0.5, 1.25, 4096), CutProfile(1, "relu", 0.75, 1.0, 4096))
    return Profile("ab" * 32, threads=2, batch=1, repeats=5, full_ms=1.75, cuts=cuts)


def test_json_round_trip() -> None:
    sample = _sample()
    data = json.loads(json.dumps(sample.to_json()))
    assert Profile.from_json(data) == sample


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("threads"),
        lambda d: d.update(version=2),
        lambda d: d.update(full_ms=-1.0),
        lambda d: d.update(full_ms=float("nan")),
        lambda d: d.update(batch=True),
        lambda d: d.update(cuts="x"),
        lambda d: d.update(model_id=3),
        lambda d: d["cuts"].reverse(),
        lambda d: d["cuts"][0].update(name=None),
        lambda d: d["cuts"][0].pop("nbytes"),
        lambda d: d["cuts"].append([]),
    ],
)
def test_from_json_rejects_malformed(mutate: object) -> None:
    data = _sample().to_json()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(PartitionError):
        Profile.from_json(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@settings(max_examples=60)
@given(json_values)
def test_from_json_on_arbitrary_values(value: object) -> None:
    with pytest.raises(PartitionError):
        Profile.from_json(value)


@settings(max_examples=60)
@given(st.dictionaries(st.sampled_from(sorted(_sample().to_json())), json_values))
def test_from_json_on_arbitrary_fields(value: dict[str, object]) -> None:
    with contextlib.suppress(PartitionError):
        Profile.from_json({**_sample().to_json(), **value})
