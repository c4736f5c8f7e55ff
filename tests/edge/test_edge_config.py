"""Edge configuration: a full TOML example parses; each kind of bad input is a ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.edge import (
    EdgeConfig,
    EdgeLimits,
    ModelSpec,
    load_edge_config,
    load_model_tails,
    load_zoo_tails,
)
from secure_ci.edge._config import parse_address
from secure_ci.exceptions import ConfigError, PackageError
from secure_ci.plan import EDGE_ONLY_CUT

GOOD = (
    """
provider = "simulated"
allowed_devices = ["0x5B38Da6a701c568545dCfcB03FcB875f56beddC4", "0x" + "ab"]
journal_dir = "journal"
chain_id = 31337

[listen]
host = "127.0.0.1"
port = 7443

[[models]]
zoo = "digits_cnn"
cuts = [2, 4]
codecs = ["float16", "int8"]

[limits]
max_frame_bytes = 1048576
max_sessions = 8
max_wait_ms = 1.5

[simulated]
mrenclave = "{m}"
mrsigner = "{s}"
export_dir = "pki"
""".replace('"0x" + "ab"', '"0x' + "ab" * 20 + '"')
    .replace("{m}", "11" * 32)
    .replace("{s}", "22" * 32)
)


def test_full_example_parses(tmp_path: Path) -> None:
    config = load_edge_config(GOOD, tmp_path)
    assert config.provider == "simulated"
    assert config.port == 7443
    assert config.models == (ModelSpec("digits_cnn", (2, 4), ("float16", "int8")),)
    assert bytes.fromhex("5B38Da6a701c568545dCfcB03FcB875f56beddC4") in config.allowed_devices
    assert config.limits == EdgeLimits(max_frame_bytes=1 << 20, max_sessions=8, max_wait_ms=1.5)
    assert config.journal_dir == (tmp_path / "journal").resolve()
    assert config.export_dir == (tmp_path / "pki").resolve()
    assert config.mrenclave == bytes.fromhex("11" * 32)
    assert config.chain_id == 31337


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('provider = "simulated"', 'provider = "tdx-magic"'),
        ("port = 7443", "port = 70000"),
        ("port = 7443", 'port = "http"'),
        ("cuts = [2, 4]", "cuts = []"),
        ("cuts = [2, 4]", 'cuts = ["2"]'),
        ('zoo = "digits_cnn"', 'zoo = "../etc"'),
        ("max_sessions = 8", "max_sessions = 0"),
        ("max_sessions = 8", "max_sessoins = 8"),
        ("max_wait_ms = 1.5", "max_wait_ms = true"),
        ("max_wait_ms = 1.5", "max_wait_ms = 1.5\nsigning_workers = 17"),
        ("max_wait_ms = 1.5", "max_wait_ms = 1.5\nsigning_workers = 1.5"),
        ("max_wait_ms = 1.5", "max_wait_ms = 1.5\nsigning_workers = -1"),
        ("5B38Da6a701c568545dCfcB03FcB875f56beddC4", "5b38Da6a701c568545dCfcB03FcB875f56beddC4"),
        ("5B38Da6a701c568545dCfcB03FcB875f56beddC4", "5B38Da6a701c568545dCfcB03FcB875f56bedd"),
        ("chain_id = 31337", "chain_id = -1"),
        ("chain_id = 31337", "chian_id = 1"),
        ("[[models]]", "[[modells]]"),
        ('mrenclave = "', 'mrenclave = "zz'),
        ('journal_dir = "journal"', "journal_dir = 3"),
        ("[listen]", "listen = 3\n[other]"),
        ("[listen]", "[listen"),
    ],
)
def test_bad_values_are_config_errors(tmp_path: Path, old: str, new: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError):
        load_edge_config(GOOD.replace(old, new, 1), tmp_path)


def test_models_are_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_edge_config('provider = "simulated"\n', tmp_path)


@given(st.text(max_size=300))
def test_arbitrary_text_is_parsed_or_refused_with_config_error(text: str) -> None:
    try:
        config = load_edge_config(text, Path("/nonexistent"))
    except ConfigError:
        return
    assert isinstance(config, EdgeConfig)


@given(st.binary(min_size=20, max_size=20))
def test_checksummed_addresses_round_trip(raw: bytes) -> None:
    from eth_utils import to_checksum_address

    assert parse_address(to_checksum_address(raw)) == raw
    assert parse_address("0x" + raw.hex()) == raw


# ------------------------------------------------------------------ model packages


def _pack(path: Path, architecture: str) -> Path:
    from secure_ci import zoo
    from secure_ci.package import pack_bytes

    torch.manual_seed(0)
    entry = zoo.get(architecture)
    data = pack_bytes(
        entry.build(),
        architecture=architecture,
        input_shape=entry.input_shape,
        codecs=("float32",),
        repeats=1,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def digits_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _pack(tmp_path_factory.mktemp("pkg") / "digits.scipkg", "digits_cnn")


PACKAGE_MODEL = """
[[models]]
package = "models/digits.scipkg"
codecs = ["int8"]
"""


def test_a_package_entry_parses(tmp_path: Path) -> None:
    config = load_edge_config(PACKAGE_MODEL, tmp_path)
    (spec,) = config.models
    assert spec == ModelSpec(
        package=(tmp_path / "models" / "digits.scipkg").resolve(), codecs=("int8",)
    )
    assert spec.zoo is None
    assert spec.cuts == ()
    with_cuts = load_edge_config(PACKAGE_MODEL + "cuts = [1, 2]\n", tmp_path)
    assert with_cuts.models[0].cuts == (1, 2)


@pytest.mark.parametrize(
    "extra",
    [
        'zoo = "digits_cnn"',
        "seed = 1",
        "cuts = [1, 1]",
        'weights = "w.safetensors"',
        "cuts = [70000]",
    ],
)
def test_bad_package_entries_are_config_errors(tmp_path: Path, extra: str) -> None:
    with pytest.raises(ConfigError):
        load_edge_config(PACKAGE_MODEL + extra + "\n", tmp_path)


@pytest.mark.parametrize(
    "entry",
    ["package = 3", 'package = ""', 'codecs = ["int8"]', "zoo = 4\ncuts = [1]", "cuts = [1]"],
)
def test_an_entry_needs_exactly_one_model_source(tmp_path: Path, entry: str) -> None:
    with pytest.raises(ConfigError):
        load_edge_config(f"[[models]]\n{entry}\n", tmp_path)


def test_model_spec_validates_itself() -> None:
    with pytest.raises(ConfigError, match="either a zoo name or a package"):
        ModelSpec(cuts=(1,))
    with pytest.raises(ConfigError, match="either a zoo name or a package"):
        ModelSpec(zoo="digits_cnn", cuts=(1,), package=Path("p"))
    with pytest.raises(ConfigError, match="cuts"):
        ModelSpec(zoo="digits_cnn")
    assert ModelSpec(package=Path("p")).name == "p"


def test_load_model_tails_serves_every_batchable_cut(digits_package: Path) -> None:
    from secure_ci.package import load_package
    from secure_ci.partition import decode_features, encode_features

    package = load_package(digits_package)
    tails = load_model_tails(ModelSpec(package=digits_package, codecs=("int8", "float32")))
    assert [t.cut for t in tails] == [*package.batchable_cuts, EDGE_ONLY_CUT]  # + whole model
    assert len(tails) == len(package.cuts) + 1
    assert all(t.batchable for t in tails)
    assert {t.model_id for t in tails} == {package.model_id}
    whole = tails[-1]  # edge-only: the input is the boundary
    x1 = torch.randn(1, 1, 32, 32)
    (logits,) = decode_features(
        whole.run_batch([whole.decode("float32", encode_features((x1,), "float32"))])[0]
    )
    with torch.no_grad():
        torch.testing.assert_close(logits, package.build()(x1), atol=1e-5, rtol=0)
    entry = tails[2]
    assert entry.inputs == package.cuts[2].boundary
    head, _ = package.partitioner().split(2)
    x = torch.randn(3, 1, 32, 32)
    requests = [entry.decode("float32", encode_features(head(x[i : i + 1]), "float32"))
                for i in range(3)]  # fmt: skip
    outputs = entry.run_batch(requests)
    with torch.no_grad():
        expected = package.build()(x)
    for i, out in enumerate(outputs):
        (logits,) = decode_features(out)
        assert torch.allclose(logits, expected[i : i + 1], atol=1e-5)


def test_load_model_tails_with_listed_cuts(digits_package: Path, tmp_path: Path) -> None:
    tails = load_model_tails(ModelSpec(package=digits_package, cuts=(2, 4), codecs=("int8",)))
    assert [t.cut for t in tails] == [2, 4, EDGE_ONLY_CUT]
    with pytest.raises(ConfigError, match="not cut 99"):
        load_model_tails(ModelSpec(package=digits_package, cuts=(99,)))
    with pytest.raises(ConfigError, match="cannot read model package"):
        load_model_tails(ModelSpec(package=tmp_path / "absent.scipkg"))
    tampered = tmp_path / "tampered.scipkg"
    data = digits_package.read_bytes()
    tampered.write_bytes(data[:-10] + bytes([data[-10] ^ 0x80]) + data[-9:])  # the digest
    with pytest.raises(PackageError, match="digest mismatch"):
        load_model_tails(ModelSpec(package=tampered))


def test_load_model_tails_for_a_zoo_entry_is_load_zoo_tails() -> None:
    spec = ModelSpec("digits_cnn", (2,), ("int8",), seed=3)
    (tail,) = load_model_tails(spec)
    (same,) = load_zoo_tails("digits_cnn", (2,), ("int8",), 3)
    assert tail.model_id == same.model_id
    assert tail.cut == same.cut == 2
