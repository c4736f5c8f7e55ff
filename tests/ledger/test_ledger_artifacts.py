"""The committed contract artifact: provenance, drift against a fresh compile, hostile input."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from eth_abi.abi import encode
from eth_utils.crypto import keccak
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.exceptions import LedgerError
from secure_ci.ledger import decode_revert, load_artifact
from secure_ci.ledger._anvil import default_ledger_dir
from secure_ci.ledger._artifacts import parse_artifact

LEDGER_DIR = default_ledger_dir()
ARTIFACT = Path(__file__).resolve().parents[2] / "secure_ci/ledger/artifacts/SecureCILedger.json"
RAW = ARTIFACT.read_bytes()


def test_artifact_matches_committed_source() -> None:
    artifact = load_artifact()
    source = (LEDGER_DIR / "contracts" / "SecureCILedger.sol").read_bytes()
    assert artifact.source_matches(source)
    assert not artifact.source_matches(source + b"\n")
    assert artifact.solc_version.startswith("0.8.30+")
    assert any(k.startswith("@openzeppelin/contracts/") for k in artifact.sources)
    names = {e["name"] for e in artifact.abi if e["type"] == "function"}
    assert {"anchorBatch", "verifyTask", "challenge", "respondChallenge", "dispute"} <= names


def test_toolchain_is_pinned_exactly() -> None:
    package = json.loads((LEDGER_DIR / "package.json").read_text())
    lock = json.loads((LEDGER_DIR / "package-lock.json").read_text())
    for name, version in package["devDependencies"].items():
        assert version[0].isdigit(), f"{name} is not pinned to an exact version"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("node") is None or not (LEDGER_DIR / "node_modules" / "solc").is_dir(),
    reason="node or ledger/node_modules missing (run `make node`)",
)
def test_no_drift_from_a_fresh_compile(tmp_path: Path) -> None:
    subprocess.run(
        ["node", "scripts/build.mjs", str(tmp_path)],
        cwd=LEDGER_DIR,
        check=True,
        capture_output=True,
        timeout=240,
    )
    fresh = json.loads((tmp_path / "SecureCILedger.json").read_text())
    committed = json.loads(RAW)
    for key in ("abi", "bytecode", "deployedBytecode", "solcVersion", "sources", "settings"):
        assert fresh[key] == committed[key], f"artifact drift in {key}: run `npm run build`"


def test_decode_revert_names_custom_errors() -> None:
    artifact = load_artifact()
    selector = keccak(text="BatchGap(uint64,uint64)")[:4]
    assert decode_revert(artifact, selector + encode(["uint64", "uint64"], [1, 3])) == "BatchGap"
    error_string = bytes.fromhex("08c379a0") + encode(["string"], ["nope"])
    assert decode_revert(artifact, error_string) == "nope"
    panic = bytes.fromhex("4e487b71") + encode(["uint256"], [0x11])
    assert decode_revert(artifact, panic) == "Panic(0x11)"
    assert decode_revert(artifact, b"") == "execution reverted"
    assert decode_revert(artifact, b"\xde\xad\xbe\xef").startswith("unknown revert")


@given(st.binary(max_size=300))
def test_decode_revert_never_raises(data: bytes) -> None:
    for prefix in (b"", bytes.fromhex("08c379a0"), bytes.fromhex("4e487b71")):
        assert isinstance(decode_revert(load_artifact(), prefix + data), str)


@given(st.binary(max_size=200))
def test_parse_artifact_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(LedgerError):
        parse_artifact(raw)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids),
        max_leaves=20,
    )
)
def test_parse_artifact_rejects_wrong_shapes(doc: object) -> None:
    with pytest.raises(LedgerError):
        parse_artifact(json.dumps(doc).encode())


def test_parse_artifact_mutations() -> None:
    """Byte flips, truncations and field swaps of the real artifact: parsed or LedgerError."""
    rng = random.Random(5)
    doc = json.loads(RAW)
    for key, bad in [
        ("abi", {}),
        ("abi", [{"type": "error", "inputs": [{"type": 3}], "name": "X"}]),
        ("abi", [{"type": "error", "inputs": [{"type": "tuple"}]}]),
        ("bytecode", "0xzz"),
        ("bytecode", "0x"),
        ("deployedBytecode", 5),
        ("sourceHash", ""),
        ("sources", {"a": 1}),
    ]:
        with pytest.raises(LedgerError):
            parse_artifact(json.dumps({**doc, key: bad}).encode())
    with pytest.raises(LedgerError):
        parse_artifact(b" " * (5 << 20))
    for _ in range(300):
        data = bytearray(RAW)
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            del data[rng.randrange(len(data)) :]
        with contextlib.suppress(LedgerError):
            parse_artifact(bytes(data))


def test_the_deployed_contracts_fit_eip_170() -> None:
    """The ledger's runtime code must fit 24,576 bytes or the chain refuses to deploy it (the
    fraud-proof decoder lives in its own contract, BatchChecker, for this)."""
    from secure_ci.ledger._artifacts import load_artifact

    assert len(load_artifact().deployed_bytecode) <= 24_576
