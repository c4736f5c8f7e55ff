"""`secure-ci partition inspect`: table, JSON summary, and clear errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from secure_ci.cli import app, main
from secure_ci.cli._partition import parse_shape
from secure_ci.exceptions import ConfigError, PartitionError
from secure_ci.partition import Profile

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Other test processes share the two cores: spinning intra-op threads only slow us down.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model() -> nn.Module:
    """Loaded by the tests below as ``test_partition_cli:tiny_model``."""
    return nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def not_a_model() -> str:
    return "model"


def test_inspect_zoo_model_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "digits.json"
    result = runner.invoke(
        app,
        [
            "partition",
            "inspect",
            "resnet18",
            "--input-shape",
            "1,3,8,8",
            "--no-profile",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "layers_0_0_conv1" in result.output
    summary = json.loads(out.read_text())
    assert summary["input_shape"] == [1, 3, 8, 8]
    assert summary["profile"] is None
    assert len(summary["model_id"]) == 64
    assert len(summary["cuts"]) > 50
    assert any(len(cut["boundary"]) == 2 for cut in summary["cuts"])


def test_inspect_module_callable_with_profile(tmp_path: Path) -> None:
    out = tmp_path / "tiny.json"
    result = runner.invoke(
        app,
        [
            "partition",
            "inspect",
            "test_partition_cli:tiny_model",
            "--input-shape",
            "1,16",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert [cut["nbytes"] for cut in summary["cuts"]] == [16, 16, 64, 64]
    assert [cut["bottleneck"] for cut in summary["cuts"]] == [True, True, False, False]
    measured = Profile.from_json(summary["profile"])
    assert measured.model_id == summary["model_id"]
    assert len(measured.cuts) == 4
    assert "◆" in result.output


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (["no_such_model"], ConfigError, "unknown zoo model"),
        (["no_such_module_xyz:f"], ConfigError, "cannot load model"),
        (["secure_ci.zoo:no_such_fn"], ConfigError, "cannot load model"),
        (["test_partition_cli:tiny_model"], ConfigError, "--input-shape is required"),
        (["resnet18", "--input-shape", "1,three"], ConfigError, "bad --input-shape"),
        (["resnet18", "--input-shape", "1,0,8"], ConfigError, "positive"),
        (["resnet18", "--input-shape", "1,1,8,8"], PartitionError, "wrong input shape"),
        (["test_partition_cli:not_a_model", "--input-shape", "1"], PartitionError, "nn.Module"),
    ],
)
def test_inspect_errors(args: list[str], error: type[Exception], message: str) -> None:
    result = runner.invoke(app, ["partition", "inspect", *args, "--no-profile"])
    assert result.exit_code != 0
    assert isinstance(result.exception, error)
    assert message in str(result.exception)


def test_parse_shape() -> None:
    assert parse_shape("1,3,32,32") == (1, 3, 32, 32)
    assert parse_shape("1x3x8x8") == (1, 3, 8, 8)
    with pytest.raises(ConfigError, match="too large"):
        parse_shape("1000,1000,1000")


def test_exit_codes_through_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    for args, code, message in (
        (["nope"], 2, "unknown zoo model 'nope'"),
        (["digits_cnn", "--input-shape", "1,3,32,32"], 1, "wrong input shape"),
    ):
        monkeypatch.setattr(
            sys, "argv", ["secure-ci", "partition", "inspect", *args, "--no-profile"]
        )
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == code
        assert message in capsys.readouterr().err
