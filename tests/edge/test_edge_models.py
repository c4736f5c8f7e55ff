"""Registered tails: the request's codec against the payload's header, batch dimensions,
tails that cannot batch."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from secure_ci.edge import TailEntry
from secure_ci.edge._models import payload_codec, probe_batching, tails_from_partitioner
from secure_ci.exceptions import CodecError, ConfigError, ProtocolError
from secure_ci.partition import (
    CODECS,
    Partitioner,
    TensorSpec,
    decode_features,
    encode_features,
)
from secure_ci.protocol import ErrorCode
from secure_ci.zoo import get

SPEC = TensorSpec((1, 4, 3, 3), "float32")


def _entry(codecs: frozenset[str] = frozenset(CODECS)) -> TailEntry:
    return TailEntry.build(bytes(32), 1, nn.Identity(), (SPEC,), codecs)


def _features(seed: int = 0) -> torch.Tensor:
    return torch.randn(SPEC.shape, generator=torch.Generator().manual_seed(seed))


def test_the_header_names_the_codec_of_every_payload() -> None:
    for codec in CODECS:
        assert payload_codec(encode_features([_features()], codec)) == codec


@pytest.mark.parametrize(
    ("named", "used"), [(a, b) for a, b in itertools.permutations(CODECS, 2)][::3]
)
def test_a_payload_under_another_served_codec_name_is_a_task_error(named: str, used: str) -> None:
    entry = _entry()
    payload = encode_features([_features()], used)
    assert entry.decode(used, payload)[0].shape == SPEC.shape
    with pytest.raises(ProtocolError, match="not encoded with") as info:
        entry.decode(named, payload)
    assert info.value.code == ErrorCode.BAD_TENSOR


@pytest.mark.parametrize("used", ["int4", "int4+zstd", "int8+lz4", "float16+zstd"])
def test_lossy_or_compressed_payloads_are_refused_under_float32(used: str) -> None:
    entry = _entry(frozenset({"float32", used}))
    with pytest.raises(ProtocolError) as info:
        entry.decode("float32", encode_features([_features()], used))
    assert info.value.code == ErrorCode.BAD_TENSOR


@given(st.binary(max_size=64))
def test_payload_codec_names_a_codec_or_refuses(data: bytes) -> None:
    try:
        name = payload_codec(data)
    except CodecError:
        return
    assert name in CODECS
    assert data[:4] == b"SCIF"


@given(st.sampled_from(CODECS), st.binary(max_size=256))
def test_decode_refuses_any_bytes_with_a_task_error(codec: str, data: bytes) -> None:
    try:
        (tensor,) = _cached_entry().decode(codec, data)
    except ProtocolError as exc:
        code = exc.code
    else:
        assert tensor.shape == SPEC.shape
        return
    assert code == ErrorCode.BAD_TENSOR


@functools.cache
def _cached_entry() -> TailEntry:
    return _entry()


@functools.cache
def _transformer() -> Partitioner:
    entry = get("transformer_encoder")
    torch.manual_seed(0)
    return Partitioner(entry.build(), (torch.zeros(entry.input_shape),))


def test_a_cut_after_a_permute_batches_along_dimension_1() -> None:
    p = _transformer()
    cut = next(c for c in p.cuts if c.name == "permute")
    (entry,) = tails_from_partitioner(p, [cut.index], ["float32"])
    assert [s.batch_dim for s in entry.inputs] == [0, 1]
    assert entry.batchable
    assert entry.output_batch_dims == (0,)
    head, _ = p.split(cut)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        samples = [tuple(head(torch.randn(1, 3, 32, 32, generator=generator))) for _ in range(3)]
    together = entry.run_batch(samples)
    alone = [entry.run_batch([s])[0] for s in samples]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(_decoded(a), _decoded(b), atol=1e-5, rtol=1e-5)


def _decoded(payload: bytes) -> torch.Tensor:
    (tensor,) = decode_features(payload)
    return tensor


class Mixing(nn.Module):
    """Batch-polymorphic, but each output depends on every sample of the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.sum()


def test_a_tail_that_mixes_samples_is_served_one_request_at_a_time() -> None:
    assert probe_batching(Mixing(), (SPEC,)) is None
    entry = TailEntry.build(bytes(32), 1, Mixing(), (SPEC,), frozenset({"float32"}))
    assert not entry.batchable
    features = (_features(1),)
    (output,) = entry.run_batch([features])
    torch.testing.assert_close(_decoded(output), features[0] * features[0].sum())
    with pytest.raises(ProtocolError) as info:
        entry.run_batch([features, features])
    assert info.value.code == ErrorCode.INTERNAL


def test_inputs_without_a_batch_dimension_are_served_unbatched() -> None:
    scalar = TensorSpec((), "float32", batch_dim=None)
    entry = TailEntry.build(bytes(32), 1, nn.Identity(), (SPEC, scalar), frozenset({"float32"}))
    assert not entry.batchable
    assert probe_batching(nn.Identity(), (scalar,)) is None


def test_tail_entries_are_validated() -> None:
    with pytest.raises(ConfigError, match="size 1"):
        TailEntry(bytes(32), 1, nn.Identity(), (TensorSpec((2, 4), "float32"),), frozenset(CODECS))
    with pytest.raises(ConfigError, match="batch dimension"):
        TailEntry(
            bytes(32),
            1,
            nn.Identity(),
            (TensorSpec((3,), "float32", batch_dim=None),),
            frozenset(CODECS),
            output_batch_dims=(0,),
        )
    permuted = TensorSpec((4, 1), "float32", batch_dim=1)
    assert TailEntry(bytes(32), 1, nn.Identity(), (permuted,), frozenset({"int8"})).inputs
