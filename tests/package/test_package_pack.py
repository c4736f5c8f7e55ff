"""Packing and loading: a trained model round-trips, classifies correctly, and is verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from package_helpers import CALIBRATION, digits_package, reseal, sections, trained, with_weights

from secure_ci.exceptions import ConfigError, PackageError
from secure_ci.package import (
    DEFAULT_CODECS,
    encode_weights,
    load_package,
    pack_bytes,
    pack_model,
    read_package,
)
from secure_ci.partition import decode_features, encode_features
from secure_ci.zoo import get
from secure_ci.zoo._digits import DIGITS_INPUT_SHAPE, DigitsCNN


def test_trained_digits_round_trip_and_classify() -> None:
    package = read_package(digits_package())
    model = trained()
    assert len(package.model_id) == 32
    assert package.model_id_hex == model.partitioner.model_id
    assert package.architecture == "digits_cnn"
    assert package.input_shape == DIGITS_INPUT_SHAPE
    assert package.cuts == model.partitioner.cuts
    assert package.partitioner().model_id == package.model_id_hex
    built = package.build()
    assert built is not package.build()
    assert not built.training
    x, y = model.data.test_x, model.data.test_y
    with torch.no_grad():
        accuracy = float((built(x).argmax(dim=1) == y).float().mean())
        assert torch.equal(built(x), model.model(x))
    assert accuracy >= 0.9


def test_codec_table_and_calibration() -> None:
    package = read_package(digits_package())
    assert package.calibration is not None
    assert package.calibration.samples == CALIBRATION
    assert package.calibration.source == "first 64 held-out digits"
    assert package.manifest.codec_inputs == "calibration"
    assert len(package.codecs) == len(package.cuts) * len(DEFAULT_CODECS)
    rows = {(row.cut, row.codec): row for row in package.codecs}
    for cut in package.cuts:
        assert rows[cut.index, "float32"].accuracy_drop_pt == 0.0
        assert 0.5 < rows[cut.index, "float16"].ratio < 0.53
        # a lossless stage only changes the bytes, never what the tail sees
        assert (
            rows[cut.index, "int8+zstd"].accuracy_drop_pt
            == rows[cut.index, "int8"].accuracy_drop_pt
        )
        if cut.nbytes >= 4096:  # per-channel parameters are small next to the payload
            assert rows[cut.index, "int8"].ratio <= 0.26
            assert rows[cut.index, "int4"].ratio <= 0.14
    # the recorded bytes are what encoding one sample's boundary really costs
    pool1 = next(cut for cut in package.cuts if cut.name == "pool1")
    head, _ = package.partitioner().split(pool1)
    sizes = [len(encode_features(head(x.unsqueeze(0)), "int8"))
             for x in trained().data.test_x[:CALIBRATION]]  # fmt: skip
    assert rows[pool1.index, "int8"].nbytes == pytest.approx(sum(sizes) / len(sizes), abs=0.1)


def test_profile_batch_dimensions_and_describe() -> None:
    package = read_package(digits_package())
    (measured,) = package.profiles
    assert measured.model_id == package.model_id_hex
    assert [c.name for c in measured.cuts] == [c.name for c in package.cuts]
    assert all(spec.batch_dim == 0 for cut in package.cuts for spec in cut.boundary)
    assert package.batchable_cuts == tuple(range(len(package.cuts)))
    summary = json.loads(json.dumps(package.describe()))
    assert summary["model_id"] == package.model_id_hex
    assert summary["package_digest"] == package.digest.hex()
    assert summary["package_bytes"] == len(digits_package())
    assert [c["name"] for c in summary["cuts"]] == [c.name for c in package.cuts]
    assert all(c["head_ms"] is not None for c in summary["cuts"])
    assert len(summary["codecs"]["rows"]) == len(package.codecs)


def test_pack_model_writes_a_file_load_package_reads(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = get("transformer_encoder").build()
    out = tmp_path / "sub" / "t.scipkg"
    stages: list[str] = []
    packed = pack_model(
        model,
        architecture="transformer_encoder",
        input_shape=(1, 3, 32, 32),
        out=out,
        repeats=1,
        progress=lambda what, done, total: stages.append(what),
    )
    assert {"analysis", "codec table", "profile"} <= set(stages)
    loaded = load_package(out)
    assert loaded.model_id == packed.model_id
    assert loaded.digest == packed.digest
    assert loaded.size == out.stat().st_size
    assert loaded.calibration is None
    assert loaded.manifest.codec_inputs == "random"
    assert all(row.accuracy_drop_pt is None for row in loaded.codecs)
    # attention reshapes move the batch: the analysis says where, and the split still holds
    moved = [c for c in loaded.cuts if any(s.batch_dim not in (0, None) for s in c.boundary)]
    assert moved
    assert not list(tmp_path.glob("sub/.*tmp*"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.build()(x), model.eval()(x))
    head, tail = loaded.partitioner().split(moved[0])
    with torch.no_grad():
        features = decode_features(encode_features(head(x[:1]), "float32"))
        assert torch.allclose(tail(*features), model(x[:1]), atol=1e-5)


def test_load_package_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read model package"):
        load_package(tmp_path / "absent.scipkg")
    with pytest.raises(ConfigError):
        load_package(tmp_path)


class _Doubled(DigitsCNN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_pack_refuses_models_the_architecture_does_not_describe() -> None:
    with pytest.raises(ConfigError, match="unknown zoo model"):
        pack_bytes(DigitsCNN(), architecture="nope", input_shape=DIGITS_INPUT_SHAPE)
    with pytest.raises(ConfigError, match="weights do not fit resnet18"):
        pack_bytes(DigitsCNN(), architecture="resnet18", input_shape=(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="does not compute"):
        pack_bytes(_Doubled(), architecture="digits_cnn", input_shape=DIGITS_INPUT_SHAPE)
    with pytest.raises(ConfigError, match=r"must be a torch\.nn\.Module"):
        pack_bytes("digits", architecture="digits_cnn", input_shape=DIGITS_INPUT_SHAPE)  # type: ignore[arg-type]
    fp64 = DigitsCNN().double()
    with pytest.raises(ConfigError, match=r"must be torch\.float32"):
        pack_bytes(fp64, architecture="digits_cnn", input_shape=DIGITS_INPUT_SHAPE)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (), (1, 0, 32, 32), (1,) * 9, [1, 1, 32, 32]])
def test_pack_refuses_bad_input_shapes(shape: object) -> None:
    with pytest.raises(ConfigError, match="input_shape"):
        pack_bytes(DigitsCNN(), architecture="digits_cnn", input_shape=shape)  # type: ignore[arg-type]


def test_pack_refuses_bad_calibration_and_codecs() -> None:
    model = DigitsCNN()
    x, y = torch.zeros(4, 1, 32, 32), torch.zeros(4, dtype=torch.int64)
    bad = [
        (x, y[:3]),
        (x.double(), y),
        (torch.zeros(4, 1, 16, 16), y),
        (x, y.float()),
        (x[:0], y[:0]),
    ]
    for calibration in bad:
        with pytest.raises(ConfigError, match="calibration"):
            pack_bytes(model, architecture="digits_cnn", input_shape=DIGITS_INPUT_SHAPE,
                       calibration=calibration)  # fmt: skip
    for codecs in (("int3",), (), ("int8", "int8")):
        with pytest.raises(ConfigError, match="codecs"):
            pack_bytes(model, architecture="digits_cnn", input_shape=DIGITS_INPUT_SHAPE,
                       codecs=codecs)  # fmt: skip


def test_a_manifest_claiming_another_model_id_is_refused() -> None:
    manifest, weights = sections(digits_package())
    manifest["model_id"] = "ab" * 32
    for profile in manifest["profiles"]:
        profile["model_id"] = "ab" * 32
    with pytest.raises(PackageError, match="model_id mismatch"):
        read_package(reseal(manifest, weights))


def test_other_weights_with_a_consistent_manifest_are_refused() -> None:
    torch.manual_seed(1)
    other = encode_weights(DigitsCNN().state_dict())
    with pytest.raises(PackageError, match="model_id mismatch"):
        read_package(with_weights(digits_package(), other))


def test_weights_not_matching_the_manifest_digest_are_refused() -> None:
    manifest, _ = sections(digits_package())
    torch.manual_seed(1)
    with pytest.raises(PackageError, match="weights do not match the digest"):
        read_package(reseal(manifest, encode_weights(DigitsCNN().state_dict())))


def test_a_doctored_analysis_is_refused() -> None:
    manifest, weights = sections(digits_package())
    manifest["analysis"]["cuts"][2]["nbytes"] += 4
    with pytest.raises(PackageError, match="partition analysis does not match"):
        read_package(reseal(manifest, weights))
    manifest, weights = sections(digits_package())
    manifest["analysis"]["cuts"][3]["boundary"][0]["batch_dim"] = None
    with pytest.raises(PackageError, match="partition analysis does not match"):
        read_package(reseal(manifest, weights))
    manifest, weights = sections(digits_package())
    manifest["analysis"]["total_flops"] += 1
    with pytest.raises(PackageError, match="partition analysis does not match"):
        read_package(reseal(manifest, weights))


def test_weights_of_the_wrong_shape_or_dtype_are_refused() -> None:
    state = DigitsCNN().state_dict()
    for name, change in (
        ("fc.bias", lambda t: t[:5].clone()),
        ("fc.bias", lambda t: t.double()),
        ("fc.weight", None),
    ):
        broken = dict(state)
        if change is None:
            del broken[name]
        else:
            broken[name] = change(broken[name])
        with pytest.raises(PackageError, match=r"fc\.(bias|weight)"):
            read_package(with_weights(digits_package(), encode_weights(broken)))
    extra = {**state, "evil": torch.zeros(1)}
    with pytest.raises(PackageError, match="unexpected evil"):
        read_package(with_weights(digits_package(), encode_weights(extra)))


def test_pack_does_not_change_the_callers_model_mode() -> None:
    model = trained().model.train()
    try:
        pack_bytes(model, architecture="digits_cnn", input_shape=DIGITS_INPUT_SHAPE, repeats=1,
                   codecs=("float32",))  # fmt: skip
        assert model.training
    finally:
        model.eval()
