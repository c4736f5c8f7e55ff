"""PartitionPlan, ExitPolicy, Cut and TensorSpec: validation, canonical encoding, parsing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_ci._encoding import canonical_cbor
from secure_ci.exceptions import PartitionError
from secure_ci.partition import Cut, ExitPolicy, PartitionPlan, TensorSpec

MODEL_ID = "ab" * 32


def _plan(**changes: object) -> PartitionPlan:
    fields: dict[str, object] = {
        "model_id": MODEL_ID,
        "cut": 7,
        "codec": "int8+zstd",
        "exit_policy": ExitPolicy(cut=3, metric="max_softmax", threshold=0.9),
    }
    fields.update(changes)
    return PartitionPlan(**fields)  # type: ignore[arg-type]


def test_round_trip_and_digest() -> None:
    plan = _plan()
    encoded = plan.encode()
    assert PartitionPlan.decode(encoded) == plan
    assert PartitionPlan.decode(encoded).digest == plan.digest
    assert len(plan.digest) == 64
    assert _plan(exit_policy=None).digest != plan.digest
    assert _plan(codec="int4+lz4").digest != plan.digest
    assert PartitionPlan.decode(_plan(exit_policy=None).encode()).exit_policy is None


def test_encoding_is_stable() -> None:
    # Pinned bytes: a change of encoding would silently change every plan digest.
    plan = PartitionPlan(model_id=MODEL_ID, cut=2, codec="float16")
    expected = canonical_cbor(
        {"v": 1, "model_id": MODEL_ID, "cut": 2, "codec": "float16", "exit": None}
    )
    assert plan.encode() == expected
    assert plan.encode().startswith(bytes([0xA5]))  # a map of five entries


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_id": "AB" * 32}, "model_id"),
        ({"model_id": "ab" * 31}, "model_id"),
        ({"cut": -1}, "plan cut"),
        ({"cut": True}, "plan cut"),
        ({"cut": 1 << 40}, "plan cut"),
        ({"codec": "int8 + zstd"}, "codec"),
        ({"codec": ""}, "codec"),
        ({"exit_policy": ExitPolicy(cut=9, metric="entropy", threshold=0.5)}, "beyond"),
        ({"exit_policy": "max_softmax"}, "ExitPolicy"),
    ],
)
def test_invalid_plans_are_rejected(changes: dict[str, object], message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        _plan(**changes)


@pytest.mark.parametrize(
    ("metric", "threshold", "message"),
    [
        ("max_softmax", 1.5, "<= 1"),
        ("entropy", -0.1, ">= 0"),
        ("entropy", float("nan"), "finite"),
        ("entropy", float("inf"), "finite"),
        ("margin", 0.5, "metric"),
        ("entropy", True, "number"),
        ("entropy", "0.5", "number"),
    ],
)
def test_invalid_exit_policies(metric: str, threshold: object, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        ExitPolicy(cut=0, metric=metric, threshold=threshold)  # type: ignore[arg-type]


def test_exit_threshold_is_normalised_to_float() -> None:
    policy = ExitPolicy(cut=0, metric="max_softmax", threshold=1)
    assert isinstance(policy.threshold, float)
    assert PartitionPlan.decode(_plan(exit_policy=policy).encode()).exit_policy == policy


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1, 2], "must be a map"),
        ({"v": 1}, "keys"),
        ({"v": 2, "model_id": MODEL_ID, "cut": 1, "codec": "int8", "exit": None}, "version"),
        ({"v": True, "model_id": MODEL_ID, "cut": 1, "codec": "int8", "exit": None}, "version"),
        ({"v": 1, "model_id": 5, "cut": 1, "codec": "int8", "exit": None}, "model_id"),
        ({"v": 1, "model_id": MODEL_ID, "cut": "1", "codec": "int8", "exit": None}, "cut"),
        ({"v": 1, "model_id": MODEL_ID, "cut": 1, "codec": b"int8", "exit": None}, "codec"),
        ({"v": 1, "model_id": MODEL_ID, "cut": 1, "codec": "int8", "exit": 3}, "map"),
        (
            {
                "v": 1,
                "model_id": MODEL_ID,
                "cut": 1,
                "codec": "int8",
                "exit": {"cut": 0, "metric": "entropy", "threshold": 1},
            },
            "float",
        ),
        (
            {
                "v": 1,
                "model_id": MODEL_ID,
                "cut": 1,
                "codec": "int8",
                "exit": {"cut": 0, "metric": ["entropy"], "threshold": 1.0},
            },
            "metric",
        ),
    ],
)
def test_decode_rejects_wellformed_cbor_with_bad_fields(value: object, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        PartitionPlan.decode(canonical_cbor(value))


def test_decode_rejects_non_canonical_oversized_and_trailing() -> None:
    good = _plan().encode()
    with pytest.raises(PartitionError, match="malformed"):
        PartitionPlan.decode(good + b"\x00")
    with pytest.raises(PartitionError, match="exceeds"):
        PartitionPlan.decode(b"\xa0" * 5000)
    # 1 encoded in a non-shortest form (0x18 0x01) is not canonical
    with pytest.raises(PartitionError, match="canonical"):
        PartitionPlan.decode(bytes([0xA1, 0x61, 0x76, 0x18, 0x01]))
    with pytest.raises(PartitionError, match="bytes"):
        PartitionPlan.decode("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        b"\x81" * 4000 + b"\x00",  # deep nesting
        b"\xa1" * 2000 + b"\x00",
        b"\xbf",  # indefinite-length map, truncated
        b"\x5b" + b"\xff" * 8,  # byte string claiming 2**64 - 1 bytes
        b"\xf7",  # undefined
        b"\xd9\xd9\xf7\x00",  # self-described CBOR tag
        b"",
    ],
)
def test_decode_hostile_inputs(data: bytes) -> None:
    with pytest.raises(PartitionError):
        PartitionPlan.decode(data)


@given(st.binary(max_size=512))
def test_decode_arbitrary_bytes_only_raises_partition_error(data: bytes) -> None:
    try:
        plan = PartitionPlan.decode(data)
    except PartitionError:
        return
    assert plan.encode() == data


@given(st.integers(min_value=0, max_value=2**32), st.randoms(use_true_random=False))
def test_mutated_plans_never_crash(seed: int, rnd: random.Random) -> None:
    data = bytearray(_plan().encode())
    for _ in range(rnd.randint(1, 4)):
        action = rnd.choice(("flip", "truncate", "insert"))
        if action == "flip" and data:
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        elif action == "truncate":
            del data[rnd.randrange(len(data) + 1) :]
        else:
            data.insert(rnd.randrange(len(data) + 1), (seed + rnd.randrange(256)) % 256)
    try:
        plan = PartitionPlan.decode(bytes(data))
    except PartitionError:
        return
    assert plan.encode() == bytes(data)  # anything accepted is canonical and re-encodes


plans = st.builds(
    PartitionPlan,
    model_id=st.text("0123456789abcdef", min_size=64, max_size=64),
    cut=st.integers(min_value=10, max_value=2**31 - 1),
    codec=st.from_regex(r"[a-z0-9]{1,8}(\+[a-z0-9]{1,8}){0,2}", fullmatch=True),
    exit_policy=st.none()
    | st.builds(
        ExitPolicy,
        cut=st.integers(min_value=0, max_value=10),
        metric=st.sampled_from(["max_softmax", "entropy"]),
        threshold=st.floats(min_value=0.0, max_value=1.0),
    ),
)


@given(plans)
def test_valid_plans_round_trip(plan: PartitionPlan) -> None:
    assert PartitionPlan.decode(plan.encode()) == plan
    assert PartitionPlan.decode(plan.encode()).digest == plan.digest


def test_tensor_spec_and_cut_validation() -> None:
    spec = TensorSpec(shape=(1, 4, 2), dtype="float32")
    assert spec.numel == 8
    assert spec.to_json() == {"shape": [1, 4, 2], "dtype": "float32", "batch_dim": 0}
    assert TensorSpec((4, 1), "float32", batch_dim=1).batch_dim == 1
    assert TensorSpec((), "float32", batch_dim=None).to_json()["batch_dim"] is None
    with pytest.raises(PartitionError, match="dtype"):
        TensorSpec(shape=(1,), dtype="float8")
    with pytest.raises(PartitionError, match="shape"):
        TensorSpec(shape=(1, -2), dtype="float32")
    for bad in (2, -1, True, 1.0):
        with pytest.raises(PartitionError, match="batch dimension"):
            TensorSpec(shape=(1, 4), dtype="float32", batch_dim=bad)  # type: ignore[arg-type]
    cut = Cut(0, "conv", (spec,), ("conv",), 32, 0.5, 0.25, False)
    assert cut.to_json()["boundary"] == [spec.to_json()]
    with pytest.raises(PartitionError, match="share"):
        Cut(0, "conv", (spec,), ("conv",), 32, 1.5, 0.25, False)
    with pytest.raises(PartitionError, match="one name"):
        Cut(0, "conv", (spec,), (), 32, 0.5, 0.25, False)
