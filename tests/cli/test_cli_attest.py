"""`secure-ci attest verify`: exit codes 0 accepted / 1 rejected / 2 usage, every input form."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from secure_ci.attestation import DevPKI, SimulatedProvider, make_ratls_certificate
from secure_ci.cli import app

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "attestation"
SGX = VECTORS / "sgx-v3-dcapqvl-sample.bin"
SGX_COLL = VECTORS / "sgx-v3-dcapqvl-sample.collateral.json"
TDX = VECTORS / "tdx-v4-dcapqvl-sample.bin"
TDX_COLL = VECTORS / "tdx-v4-dcapqvl-sample.collateral.json"
AT = "1750500000"
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
runner = CliRunner()


@pytest.fixture
def sgx_policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(
        f"""[attestation]
roots = ["intel"]
mrenclave = ["{MRENCLAVE}"]
tcb_status = ["UpToDate", "ConfigurationAndSWHardeningNeeded"]
advisories = ["*"]
"""
    )
    return path


def _verify(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, ["attest", "verify", *map(str, args)])
    return result.exit_code, result.output


@pytest.mark.parametrize("form", ["binary", "hex", "base64"])
def test_accepted_in_every_encoding(tmp_path: Path, sgx_policy: Path, form: str) -> None:
    raw = SGX.read_bytes()
    path = tmp_path / f"quote.{form}"
    path.write_bytes(
        {"binary": raw, "hex": raw.hex().encode(), "base64": base64.b64encode(raw)}[form]
    )
    code, out = _verify(path, "--collateral", SGX_COLL, "--at", AT, "--policy", sgx_policy)
    assert code == 0, out
    assert out.startswith("accepted")
    assert f"mrenclave: {MRENCLAVE}" in out


def test_json_output(sgx_policy: Path) -> None:
    code, out = _verify(SGX, "--collateral", SGX_COLL, "--at", AT, "--policy", sgx_policy, "--json")
    assert code == 0
    fields = json.loads(out)
    assert fields["accepted"] is True
    assert fields["tcb_status"] == "ConfigurationAndSWHardeningNeeded"


def test_default_policy_rejects_unlisted_measurement() -> None:
    code, out = _verify(SGX, "--collateral", SGX_COLL, "--at", AT)
    assert code == 1
    assert "rejected: MeasurementError:" in out


def test_debug_quote_rejected() -> None:
    code, out = _verify(
        VECTORS / "sgx-v3-automata-solana.bin", "--collateral", SGX_COLL, "--at", AT
    )
    assert code == 1
    assert "rejected: DebugEnclaveError" in out


def test_expired_collateral_rejected(sgx_policy: Path) -> None:
    code, out = _verify(SGX, "--collateral", SGX_COLL, "--policy", sgx_policy)
    assert code == 1
    assert "rejected: CollateralError" in out


TDX_MRTD = (
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a"
    "3520c942a604a407de03ae6dc5f87f27428b2538873118b7"
)


def test_genuine_tdx_quote_with_zero_padding(tmp_path: Path) -> None:
    assert TDX.read_bytes()[-70:] == bytes(70)
    code, out = _verify(TDX, "--collateral", TDX_COLL, "--at", AT, "--json")
    assert code == 1  # the default policy lists no MRTD
    assert json.loads(out.splitlines()[0])["error"] == "MeasurementError"
    mrtd_only = tmp_path / "mrtd-only.toml"
    mrtd_only.write_text(f'[attestation]\nmrtd = ["{TDX_MRTD}"]\n')
    code, out = _verify(TDX, "--collateral", TDX_COLL, "--at", AT, "--policy", mrtd_only)
    assert code == 2
    assert "must pin every RTMR" in out
    assert "rtmr_any = true" in out
    explicit = tmp_path / "rtmr-any.toml"
    explicit.write_text(f'[attestation]\nmrtd = ["{TDX_MRTD}"]\nrtmr_any = true\n')
    code, out = _verify(TDX, "--collateral", TDX_COLL, "--at", AT, "--policy", explicit, "--json")
    assert code == 0, out
    fields = json.loads(out)
    assert fields["accepted"] is True
    assert (fields["mrtd"], fields["tcb_status"]) == (TDX_MRTD, "UpToDate")
    pinned = tmp_path / "pinned.toml"
    rtmrs = "".join(f'rtmr{i} = ["{r}"]\n' for i, r in enumerate(fields["rtmrs"]))
    pinned.write_text(f'[attestation]\nmrtd = ["{TDX_MRTD}"]\n{rtmrs}')
    code, out = _verify(TDX, "--collateral", TDX_COLL, "--at", AT, "--policy", pinned)
    assert code == 0, out
    assert out.startswith("accepted")
    spoiled = tmp_path / "spoiled.bin"
    spoiled.write_bytes(TDX.read_bytes()[:-1] + b"\x01")
    code, out = _verify(spoiled, "--collateral", TDX_COLL, "--at", AT, "--policy", pinned)
    assert code == 1
    assert "rejected: EvidenceFormatError: non-zero byte 0x01" in out
    code, out = _verify(TDX, "--collateral", TDX_COLL, "--at", AT, "--allow-trailing")
    assert code == 2  # the option is gone: there is no way to accept unsigned content


def test_ratls_certificate_pem_and_der(tmp_path: Path) -> None:
    now = int(AT)
    pki = DevPKI.generate(now, seed=3)
    provider = SimulatedProvider(pki, mrenclave=bytes(32), mrsigner=bytes(32))
    creds = make_ratls_certificate(provider, now=now)
    (tmp_path / "root.pem").write_text(pki.root_pem)
    (tmp_path / "coll.json").write_text(pki.collateral_json)
    (tmp_path / "p.toml").write_text(
        f'[attestation]\nroots = ["root.pem"]\nmrenclave = ["{"00" * 32}"]\n'
    )
    (tmp_path / "cert.pem").write_text(creds.cert_pem)
    (tmp_path / "cert.der").write_bytes(creds.cert_der)
    for cert in ("cert.pem", "cert.der"):
        code, out = _verify(
            tmp_path / cert, "--collateral", tmp_path / "coll.json", "--at", AT,
            "--policy", tmp_path / "p.toml",
        )  # fmt: skip
        assert code == 0, out
    code, out = _verify(tmp_path / "cert.pem", "--collateral", tmp_path / "coll.json", "--at", AT)
    assert code == 1
    assert "EvidenceSignatureError" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([str(SGX)], "collateral is needed"),
        (["/no/such/quote", "--collateral", str(SGX_COLL)], "cannot read quote"),
        ([str(SGX), "--collateral", "/no/such/bundle"], "cannot read collateral"),
        ([str(SGX), "--collateral", str(SGX)], "bad collateral"),
        ([str(SGX), "--collateral", str(SGX_COLL), "--policy", str(SGX_COLL)], "bad policy"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    code, out = _verify(*args)
    assert code == 2
    assert message in out
