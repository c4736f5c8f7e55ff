"""`secure-ci attest simulate` writes dev artefacts that `secure-ci attest verify` accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from typer.testing import CliRunner

from secure_ci.attestation import Policy, extract_evidence, parse_quote
from secure_ci.cli import app
from secure_ci.testing import DEV_NOW

runner = CliRunner()
MRENCLAVE = "ab" * 32


def _simulate(out: Path, *extra: str) -> str:
    result = runner.invoke(
        app, ["attest", "simulate", "--out", str(out), "--at", str(DEV_NOW), *extra]
    )
    assert result.exit_code == 0, result.output
    return result.output


def _verify(out: Path, evidence: str, *extra: str) -> tuple[int, str]:
    args = ["attest", "verify", str(out / evidence), "--collateral", str(out / "collateral.json")]
    result = runner.invoke(app, [*args, "--at", str(DEV_NOW), "--json", *extra])
    return result.exit_code, result.output


def test_simulate_writes_everything(tmp_path: Path) -> None:
    output = _simulate(tmp_path, "--mrenclave", MRENCLAVE)
    names = {"root.pem", "collateral.json", "policy.toml", "quote.bin", "cert.pem", "key.pem"}
    assert {p.name for p in tmp_path.iterdir()} == names
    assert "secure-ci attest verify" in output
    policy = Policy.from_toml((tmp_path / "policy.toml").read_text(), base_dir=tmp_path)
    assert policy.mrenclave == frozenset({bytes.fromhex(MRENCLAVE)})
    assert not policy.allow_debug
    assert parse_quote((tmp_path / "quote.bin").read_bytes()).body.mrenclave.hex() == MRENCLAVE  # type: ignore[union-attr]
    cert = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    assert extract_evidence(cert.public_bytes(Encoding.DER)).encoding == "quote"


@pytest.mark.parametrize("evidence", ["quote.bin", "cert.pem"])
def test_simulated_evidence_verifies_with_its_policy(tmp_path: Path, evidence: str) -> None:
    _simulate(tmp_path)
    code, output = _verify(tmp_path, evidence, "--policy", str(tmp_path / "policy.toml"))
    assert code == 0, output
    assert json.loads(output)["accepted"] is True


def test_simulated_evidence_refused_under_default_intel_policy(tmp_path: Path) -> None:
    _simulate(tmp_path)
    code, output = _verify(tmp_path, "quote.bin")
    assert code == 1
    assert json.loads(output.splitlines()[0])["accepted"] is False


def test_debug_quote_refused_by_written_policy(tmp_path: Path) -> None:
    _simulate(tmp_path, "--debug")
    code, output = _verify(tmp_path, "quote.bin", "--policy", str(tmp_path / "policy.toml"))
    assert code == 1
    assert json.loads(output.splitlines()[0])["error"] == "DebugEnclaveError"


@pytest.mark.parametrize("bad", ["zz", "ab" * 31, "ab" * 33])
def test_bad_mrenclave_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    result = runner.invoke(app, ["attest", "simulate", "--out", str(tmp_path), "--mrenclave", bad])
    assert result.exit_code == 2
    assert not any(tmp_path.iterdir())


def test_unwritable_out_is_a_usage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["attest", "simulate", "--out", str(blocker / "sub")])
    assert result.exit_code == 2
