"""Exit heads in model packages: trained, calibrated on held-out samples, verified on load."""

from __future__ import annotations

import copy
import functools
import hashlib
import math
from typing import Any

import pytest
import torch
from package_helpers import (
    CALIBRATION,
    digits_package,
    exit_section,
    raw_container,
    reseal,
    sections,
    trained,
    with_exits,
)

from secure_ci.exceptions import ConfigError, PackageError
from secure_ci.package import (
    DEFAULT_EXIT_THRESHOLDS,
    ModelPackage,
    default_exit_cuts,
    encode_weights,
    pack_bytes,
    read_package,
)
from secure_ci.package._format import canonical_json
from secure_ci.partition import ExitHead, ExitPolicy, attach_exit
from secure_ci.plan import ExitCalibration, ModelCosts
from secure_ci.zoo._digits import DIGITS_INPUT_SHAPE


@functools.cache
def _package() -> ModelPackage:
    return read_package(digits_package())


def _calibration() -> tuple[torch.Tensor, torch.Tensor]:
    data = trained().data
    return data.test_x[:CALIBRATION], data.test_y[:CALIBRATION]


@functools.cache
def _float32_only() -> bytes:
    """The digits package again, with one codec (quicker): the exit heads must not change."""
    return pack_bytes(
        trained().model,
        architecture="digits_cnn",
        input_shape=DIGITS_INPUT_SHAPE,
        calibration=_calibration(),
        calibration_source="first 64 held-out digits",
        codecs=("float32",),
        repeats=1,
    )


def test_a_calibrated_package_carries_exit_heads_at_two_early_cuts() -> None:
    package = _package()
    assert package.exit_cuts == default_exit_cuts(package.partitioner()) == (2, 4)
    for cut in package.exit_cuts:
        assert package.cuts[cut].head_flops_share <= 0.5
    table = package.manifest.exits
    assert table is not None
    assert table.training.samples + table.calibration.samples == CALIBRATION
    assert "even positions" in table.training.source
    assert "odd positions" in table.calibration.source
    assert len(package.exits) == len(package.exit_cuts) * len(DEFAULT_EXIT_THRESHOLDS)
    for calibration in package.exits:
        assert isinstance(calibration, ExitCalibration)
        assert calibration.policy.metric == "max_softmax"
        assert 0.0 <= calibration.p_exit <= 1.0
        assert calibration.accuracy_drop >= 0.0
        assert 0.0 < calibration.head_ms < 1000.0
    for head in table.heads:  # a stricter threshold never exits more often
        rates = [row.p_exit for row in head.rows]
        assert rates == sorted(rates, reverse=True)
    assert package.describe()["exits"] == table.to_json()


def test_exit_heads_round_trip_and_run_on_the_device_side() -> None:
    package = _package()
    x, _ = _calibration()
    state = torch.random.get_rng_state()
    for cut in package.exit_cuts:
        head = package.exit_head(cut)
        assert isinstance(head, ExitHead)
        assert not head.training
        assert head is not package.exit_head(cut)
        weight, bias = (f"exit.{cut}.linear.weight", f"exit.{cut}.linear.bias")
        stored = _tensors()
        assert torch.equal(head.linear.weight, stored[weight])
        assert torch.equal(head.linear.bias, stored[bias])
        with torch.no_grad():
            head.linear.weight.zero_()  # a fresh module: the package's copy is untouched
        assert not torch.equal(package.exit_head(cut).linear.weight, head.linear.weight)
        split_head, _ = package.partitioner().split(cut)
        with torch.no_grad():
            _boundary, logits = attach_exit(split_head, package.exit_head(cut))(x[:3])
        assert logits.shape == (3, 10)
        assert bool(torch.isfinite(logits).all())
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ConfigError, match="no exit head at cut 0"):
        package.exit_head(0)


def test_calibration_recomputed_independently_on_the_held_out_samples() -> None:
    package = _package()
    x, y = _calibration()
    held_x, held_y = x[1::2], y[1::2]  # the documented split: odd positions calibrate
    model = package.build()
    with torch.no_grad():
        full = model(held_x).argmax(dim=1)
    baseline = (full == held_y).double().mean().item()
    table = package.manifest.exits
    assert table is not None
    assert table.calibration.accuracy == pytest.approx(baseline, abs=1e-6)
    for info in table.heads:
        split_head, _ = package.partitioner().split(info.cut)
        with torch.no_grad():
            boundary = split_head(held_x)
            boundary = boundary if isinstance(boundary, tuple) else (boundary,)
            logits = package.exit_head(info.cut)(*boundary).double()
        confidence = torch.softmax(logits, dim=1).max(dim=1).values
        for row in info.rows:
            leave = confidence >= row.threshold
            answer = torch.where(leave, logits.argmax(dim=1), full)
            accuracy = (answer == held_y).double().mean().item()
            assert row.p_exit == pytest.approx(leave.double().mean().item(), abs=1e-6)
            assert row.accuracy_drop_pt == pytest.approx(100 * (baseline - accuracy), abs=1e-3)


def test_same_inputs_give_the_same_exit_heads_and_calibration() -> None:
    first, second = sections(digits_package())[0], sections(_float32_only())[0]
    assert exit_section(digits_package()) == exit_section(_float32_only())
    for manifest in (first, second):  # only the measured latency may differ
        for head in manifest["exits"]["heads"]:
            head["head_ms"] = 0.0
    assert first["exits"] == second["exits"]


def test_exit_heads_trained_on_a_separate_set_calibrate_on_all_samples() -> None:
    data = trained().data
    training = (data.train_x[:300], data.train_y[:300])
    package = read_package(
        pack_bytes(
            trained().model,
            architecture="digits_cnn",
            input_shape=DIGITS_INPUT_SHAPE,
            calibration=_calibration(),
            codecs=("float32",),
            repeats=1,
            exits=[1],
            exit_training=training,
            exit_training_source="300 training digits",
            exit_thresholds=(0.9, 0.5),
            exit_seed=7,
        )
    )
    table = package.manifest.exits
    assert table is not None
    assert package.exit_cuts == (1,)
    assert (table.training.source, table.training.samples, table.training.seed) == (
        "300 training digits", 300, 7
    )  # fmt: skip
    assert table.calibration.samples == CALIBRATION
    assert [row.threshold for row in table.heads[0].rows] == [0.5, 0.9]
    assert [c.policy for c in package.exits] == [
        ExitPolicy(1, "max_softmax", 0.5), ExitPolicy(1, "max_softmax", 0.9)
    ]  # fmt: skip


def test_the_planner_accepts_the_package_exits() -> None:
    package = _package()
    profile = package.profiles[0]
    costs = ModelCosts.from_profiles(profile, profile, exits=package.exits)
    assert costs.exits == package.exits


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"exits": [2], "calibration": None}, "need a calibration set"),
        ({"exits": [9]}, "not one of the model's cuts"),
        ({"exits": [2, 2]}, "distinct"),
        ({"exits": "2"}, "sequence of cut indices"),
        ({"exits": [True]}, "not a cut index"),
        ({"exit_thresholds": (1.5,)}, "max-softmax values"),
        ({"exit_thresholds": ()}, "distinct values"),
        ({"exit_seed": -1}, "seed"),
        ({"exit_training": (torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.int64))},
         "shaped like"),
        ({"exit_training": (torch.zeros(3, 1, 32, 32), torch.full((3,), 10))},
         "labels in 0..9"),
    ],
)  # fmt: skip
def test_bad_exit_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"calibration": _calibration(), "exits": [2], **options}
    with pytest.raises(ConfigError, match=message):
        pack_bytes(trained().model, architecture="digits_cnn", input_shape=DIGITS_INPUT_SHAPE,
                   codecs=("float32",), repeats=1, **arguments)  # fmt: skip


def test_no_exits_when_asked_or_without_calibration() -> None:
    for options in ({"calibration": _calibration(), "exits": ()}, {}):
        data = pack_bytes(trained().model, architecture="digits_cnn",
                          input_shape=DIGITS_INPUT_SHAPE, codecs=("float32",), repeats=1,
                          **options)  # type: ignore[arg-type]  # fmt: skip
        package = read_package(data)
        assert (package.exit_cuts, package.exits, package.manifest.exits) == ((), (), None)
        assert exit_section(data) == b""
        assert sections(data)[0]["exits"] is None


def test_version_1_packages_still_load_without_exit_heads() -> None:
    manifest, weights = sections(digits_package())
    del manifest["exits"]
    package = read_package(raw_container(canonical_json(manifest), weights, version=1))
    assert package.model_id == _package().model_id
    assert package.exits == ()
    manifest["exits"] = None  # a version 1 file never has the key; version 2 always has it
    with pytest.raises(PackageError, match="exactly the keys"):
        read_package(raw_container(canonical_json(manifest), weights, version=1))
    del manifest["exits"]
    with pytest.raises(PackageError, match="exactly the keys"):
        read_package(raw_container(canonical_json(manifest), weights, version=2))


def _tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    return dict(st_load(exit_section(digits_package())))


def _with_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    return with_exits(digits_package(), encode_weights(tensors))


def _nan() -> dict[str, torch.Tensor]:
    tensors = _tensors()
    tensors["exit.2.linear.weight"] = tensors["exit.2.linear.weight"].clone()
    tensors["exit.2.linear.weight"][0, 0] = math.nan
    return tensors


def _edit(**changes: Any) -> dict[str, torch.Tensor]:
    tensors = _tensors()
    for name, value in changes.items():
        key = name.replace("__", ".")
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value(tensors[key]) if callable(value) else value
    return tensors


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (_nan, "non-finite"),
        (lambda: _edit(exit__2__linear__weight=lambda t: t.t().contiguous()), "not float32"),
        (lambda: _edit(exit__4__linear__bias=lambda t: t.double()), "not float32"),
        (lambda: _edit(exit__4__linear__bias=None), "other tensors"),
        (lambda: _edit(exit__3__linear__bias=torch.zeros(10)), "other tensors"),
        (lambda: _edit(exit__2__linear__weight=lambda t: t[:, :64].contiguous()),
         "not float32"),
    ],
)  # fmt: skip
def test_tampered_exit_tensors_are_refused(tensors: Any, message: str) -> None:
    with pytest.raises(PackageError, match=message):
        read_package(_with_tensors(tensors()))


def _mutated(change: Any) -> bytes:
    manifest, weights = sections(digits_package())
    mutated = copy.deepcopy(manifest)
    change(mutated["exits"], mutated)
    return reseal(mutated, weights, exit_section(digits_package()))


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def change(exits: dict[str, Any], _: dict[str, Any]) -> None:
        parent = exits
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set(("sha256",), "0" * 64), "do not match the digest"),
        (_set(("bytes",), 12), "do not match the digest"),
        (lambda e, m: m.update(exits=None), "section its manifest omits"),
        (_set(("heads", 0, "cut"), 9), "not distinct model cuts"),
        (_set(("heads", 0, "cut"), 4), "not distinct model cuts"),
        (_set(("heads", 0, "cut"), 3), "other tensors"),
        (_set(("heads", 0, "pool"), 2), "not float32"),
        (_set(("heads", 0, "pool"), 10**6), "exit pool"),
        (_set(("heads", 0, "classes"), 11), "disagree|classes"),
        (_set(("heads", 1, "classes"), 11), "disagree"),
        (lambda e, m: [h.update(classes=11) for h in e["heads"]], "11 classes, the model 10"),
        (_set(("heads", 0, "head_ms"), -1), "head_ms"),
        (_set(("heads", 0, "head_ms"), 1e300), "head_ms"),
        (_set(("heads", 0, "rows"), []), "distinct"),
        (_set(("heads", 0, "rows", 0, "p_exit"), 1.5), "p_exit"),
        (_set(("heads", 0, "rows", 0, "threshold"), 2), "threshold"),
        (_set(("heads", 0, "rows", 0, "threshold"), 0.6), "distinct"),
        (_set(("heads", 0, "rows", 0, "metric"), "margin"), "metric"),
        (_set(("heads", 0, "rows", 0, "accuracy_drop_pt"), 101), "accuracy drop"),
        (_set(("heads", 0, "rows", 0, "accuracy_drop_pt"), "1"), "must be a number"),
        (_set(("heads",), []), "at least one"),
        (_set(("heads",), [{}] * 17), "at most 16"),
        (_set(("training", "samples"), 0), "training samples"),
        (_set(("calibration", "accuracy"), 2), "calibration accuracy"),
    ],
)
def test_tampered_exit_manifests_are_refused(change: Any, message: str) -> None:
    with pytest.raises(PackageError, match=message):
        read_package(_mutated(change))


def test_an_exit_section_in_a_package_without_exits_is_refused() -> None:
    manifest, weights = sections(digits_package())
    manifest["exits"] = None
    with pytest.raises(PackageError, match="omits"):
        read_package(reseal(manifest, weights, encode_weights(_tensors())))
    table = sections(digits_package())[0]["exits"]
    assert table["sha256"] == hashlib.sha256(exit_section(digits_package())).hexdigest()
