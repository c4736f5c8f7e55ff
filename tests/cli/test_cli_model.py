"""`secure-ci model pack|inspect`, run as a user runs them: separate processes, exit codes,
one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from secure_ci.cli import app
from secure_ci.exceptions import ConfigError
from secure_ci.package import load_package
from secure_ci.partition import CanonicalRule
from secure_ci.zoo import get
from secure_ci.zoo._train import load_digits_data

SHARED_CACHE = Path(tempfile.gettempdir()) / "secure-ci-test-cache"
BIN = Path(sys.executable).parent / "secure-ci"


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(BIN), *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cli")


@pytest.fixture(scope="module")
def digits_package(workdir: Path) -> Path:
    out = workdir / "digits.scipkg"
    result = run("model", "pack", "digits_cnn", "--train", "--out", out,
                 "--cache-dir", SHARED_CACHE, cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"packed digits_cnn -> {out}" in result.stdout
    return out


@pytest.fixture(scope="module")
def transformer_weights(workdir: Path) -> Path:
    torch.manual_seed(5)
    path = workdir / "transformer.safetensors"
    save_file(get("transformer_encoder").build().state_dict(), str(path))
    return path


def test_pack_train_holds_the_trained_model_and_its_calibration(digits_package: Path) -> None:
    package = load_package(digits_package)
    data = load_digits_data()
    with torch.no_grad():
        logits = package.build()(data.test_x)
    assert float((logits.argmax(dim=1) == data.test_y).float().mean()) >= 0.9
    assert package.calibration is not None
    assert package.calibration.samples == len(data.test_y)
    assert package.calibration.accuracy >= 0.9
    for row in package.codecs:  # the design's accuracy budget, on cuts worth quantizing
        assert row.accuracy_drop_pt is not None
        if package.cuts[row.cut].nbytes >= 4096 and row.codec.startswith("int8"):
            assert row.accuracy_drop_pt <= 0.3
        if package.cuts[row.cut].nbytes >= 4096 and row.codec.startswith("int4"):
            assert row.accuracy_drop_pt <= 1.5
    exits = package.manifest.exits  # trained on the training split, calibrated on held-out
    assert exits is not None
    assert package.exit_cuts == (2, 4)
    assert exits.training.samples == len(data.train_y)
    assert exits.calibration.samples == len(data.test_y)
    for head in exits.heads:  # a confident exit is nearly free and frequent on digits
        strict = next(row for row in head.rows if row.threshold == 0.99)
        assert strict.accuracy_drop_pt <= 1.0
        assert strict.p_exit >= 0.3


def test_inspect_prints_what_the_package_holds(digits_package: Path, workdir: Path) -> None:
    package = load_package(digits_package)
    result = run("model", "inspect", digits_package, "--json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model_id"] == package.model_id_hex
    assert summary["architecture"] == "digits_cnn"
    assert [c["name"] for c in summary["cuts"]] == [c.name for c in package.cuts]
    assert summary["codecs"]["calibration"]["samples"] == package.calibration.samples  # type: ignore[union-attr]
    result = run("model", "inspect", digits_package, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert package.model_id_hex in result.stdout
    assert "int8+zstd" in result.stdout
    assert "pool1" in result.stdout
    assert "exit heads" in result.stdout
    assert "0.99" in result.stdout
    assert [h["cut"] for h in summary["exits"]["heads"]] == list(package.exit_cuts)


@pytest.mark.parametrize(("option", "cuts"), [(["--exits", "1"], (1,)), (["--no-exits"], ())])
def test_pack_chooses_the_exit_heads(
    option: list[str], cuts: tuple[int, ...], workdir: Path
) -> None:
    out = workdir / f"exits-{len(cuts)}.scipkg"
    result = run("model", "pack", "digits_cnn", "--train", "--out", out, "--repeats", "1",
                 "--cache-dir", SHARED_CACHE, *option, cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    package = load_package(out)
    assert package.exit_cuts == cuts
    assert ("exit heads at cuts" in result.stdout) == bool(cuts)
    inspect = run("model", "inspect", out, cwd=workdir)
    assert ("exit heads  none" in inspect.stdout) == (not cuts)


def test_a_tampered_package_is_rejected_with_exit_1(digits_package: Path, workdir: Path) -> None:
    data = digits_package.read_bytes()
    flipped = workdir / "flipped.scipkg"
    flipped.write_bytes(data[:200] + bytes([data[200] ^ 1]) + data[201:])
    truncated = workdir / "truncated.scipkg"
    truncated.write_bytes(data[:-1])
    for path, reason in ((flipped, "digest mismatch"), (truncated, "truncated")):
        result = run("model", "inspect", path, cwd=workdir)
        assert result.returncode == 1
        assert result.stderr.startswith("error:")
        assert reason in result.stderr


def test_pack_weights_file(transformer_weights: Path, workdir: Path) -> None:
    out = workdir / "transformer.scipkg"
    result = run("model", "pack", "transformer_encoder", "--weights", transformer_weights,
                 "--out", out, "--repeats", "1", "--canonical", "topk:3", cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    package = load_package(out)
    assert package.canonical == CanonicalRule("topk", k=3)
    torch.manual_seed(5)
    model = get("transformer_encoder").build().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(package.build()(x), model(x))
    assert package.calibration is None


def test_pack_torch_state_dict(workdir: Path) -> None:
    torch.manual_seed(6)
    model = get("transformer_encoder").build()
    weights = workdir / "transformer.pt"
    torch.save({"state_dict": model.state_dict()}, weights)
    out = workdir / "from-pt.scipkg"
    result = run("model", "pack", "transformer_encoder", "--weights", weights, "--out", out,
                 "--repeats", "1", cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_package(out).build()(x), model.eval()(x))


USAGE_ERRORS = [
    (["inspect", "{w}/absent.scipkg"], "cannot read model package"),
    (["pack", "digits_cnn", "--out", "{w}/x.scipkg"], "exactly one of"),
    (["pack", "digits_cnn", "--train", "--weights", "{t}", "--out", "{w}/x.scipkg"], "exactly one"),
    (["pack", "resnet18", "--train", "--out", "{w}/x.scipkg"], "only available for"),
    (["pack", "nope", "--weights", "{t}", "--out", "{w}/x.scipkg"], "unknown zoo model"),
    (["pack", "digits_cnn", "--weights", "{t}", "--out", "{w}/x.scipkg"], "do not fit"),
    (["pack", "digits_cnn", "--weights", "{w}/absent", "--out", "{w}/x.scipkg"], "cannot read"),
    (["pack", "digits_cnn", "--weights", "{w}/garbage.safetensors", "--out", "{w}/x.scipkg"],
     "not a usable safetensors file"),
    (["pack", "digits_cnn", "--weights", "{w}/garbage.pt", "--out", "{w}/x.scipkg"],
     "not a usable torch state dict"),
    (["pack", "transformer_encoder", "--weights", "{t}", "--input-shape", "1,0",
      "--out", "{w}/x.scipkg"], "input-shape"),
    (["pack", "digits_cnn", "--train", "--exits", "2", "--no-exits", "--out", "{w}/x.scipkg"],
     "at most one of"),
    (["pack", "digits_cnn", "--train", "--exits", "two", "--out", "{w}/x.scipkg"], "bad --exits"),
    (["pack", "transformer_encoder", "--weights", "{t}", "--canonical", "topk:0",
      "--out", "{w}/x.scipkg"], "bad --canonical"),
    (["pack", "transformer_encoder", "--weights", "{t}", "--exits", "2", "--out", "{w}/x.scipkg"],
     "need a calibration set"),
]  # fmt: skip


def _argv(args: list[str], workdir: Path, weights: Path) -> list[str]:
    (workdir / "garbage.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not json")
    (workdir / "garbage.pt").write_bytes(b"PK\x03\x04 not a zip")
    return ["model", *(a.format(w=workdir, t=weights) for a in args)]


@pytest.mark.parametrize(("args", "reason"), [USAGE_ERRORS[i] for i in (0, 1, 5, 7)])
def test_usage_errors_exit_2(
    args: list[str], reason: str, workdir: Path, transformer_weights: Path
) -> None:
    result = run(*_argv(args, workdir, transformer_weights), cwd=workdir)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error:"), result.stderr
    assert reason in result.stderr
    assert not (workdir / "x.scipkg").exists()


@pytest.mark.parametrize(("args", "reason"), USAGE_ERRORS)
def test_every_usage_error_is_a_config_error(
    args: list[str], reason: str, workdir: Path, transformer_weights: Path
) -> None:
    """In process (the exit code follows from the type, as the subprocess cases show)."""
    result = CliRunner().invoke(app, _argv(args, workdir, transformer_weights))
    assert isinstance(result.exception, ConfigError), result.output
    assert reason in str(result.exception)
    assert not (workdir / "x.scipkg").exists()
