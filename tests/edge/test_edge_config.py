"""Edge configuration: a full TOML example parses; each kind of bad input is a ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.edge import EdgeConfig, EdgeLimits, ModelSpec, load_edge_config
from secure_ci.edge._config import parse_address
from secure_ci.exceptions import ConfigError

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
