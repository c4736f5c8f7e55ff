"""The Gramine manifest template renders and validates; bad values and templates are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.edge import REQUIRED_MANIFEST_KEYS, render_manifest, validate_manifest
from secure_ci.exceptions import ConfigError

TEMPLATE = Path(__file__).resolve().parents[2] / "enclave" / "secure-ci-edge.manifest.template"

VALUES: dict[str, object] = {
    "python": "/usr/bin/python3.11",
    "python_prefix": "/usr",
    "venv_site": "/opt/secure-ci/lib/python3.11/site-packages",
    "gramine_libos": "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so",
    "gramine_runtimedir": "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc",
    "arch_libdir": "/lib/x86_64-linux-gnu",
    "app_dir": "/opt/secure-ci/app",
    "data_dir": "/var/lib/secure-ci",
    "sealed_dir": "/var/lib/secure-ci-sealed",
    "log_level": "error",
    "enclave_size": "8G",
    "max_threads": 64,
    "max_threads_torch": 8,
    "edmm_enable": False,
    "isvprodid": 1,
    "isvsvn": 1,
}


def test_template_renders_to_a_valid_production_manifest() -> None:
    manifest = validate_manifest(render_manifest(TEMPLATE.read_text(), VALUES))
    assert manifest["sgx"]["remote_attestation"] == "dcap"
    assert manifest["sgx"]["debug"] is False
    assert manifest["sgx"]["edmm_enable"] is False
    assert manifest["sgx"]["max_threads"] == 64
    assert manifest["libos"]["entrypoint"] == "/usr/bin/python3.11"
    assert manifest["loader"]["argv"][1:4] == ["-m", "secure_ci", "edge"]
    assert "file:/opt/secure-ci/app/" in manifest["sgx"]["trusted_files"]
    assert {m["path"] for m in manifest["fs"]["mounts"]} >= {"/lib", "/app", "/tmp", "/sealed"}
    sealed = next(m for m in manifest["fs"]["mounts"] if m["path"] == "/sealed")
    assert sealed == {
        "type": "encrypted",
        "path": "/sealed",
        "uri": "file:/var/lib/secure-ci-sealed",
        "key_name": "_sgx_mrenclave",
    }
    assert len(REQUIRED_MANIFEST_KEYS) >= 8


def test_missing_value_is_refused() -> None:
    values = dict(VALUES)
    del values["app_dir"]
    with pytest.raises(ConfigError, match="app_dir"):
        render_manifest(TEMPLATE.read_text(), values)


@pytest.mark.parametrize("bad", ['/x"\nsgx.debug = true\n#', "a\\b", "x y", "{{ python }}"])
def test_injection_through_values_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        render_manifest(TEMPLATE.read_text(), {**VALUES, "app_dir": bad})


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('sgx.remote_attestation = "dcap"', 'sgx.remote_attestation = "none"'),
        ("sgx.debug = false", "sgx.debug = true"),
        ('sgx.enclave_size = "{{ enclave_size }}"', 'sgx.enclave_size = "lots"'),
        ("sgx.max_threads = {{ max_threads }}", "sgx.max_threads = 1"),
        ('"file:{{ app_dir }}/",', '"{{ app_dir }}/",'),
        ("loader.argv", "loader.args"),
        ("fs.mounts = [", "fs.mounts = 3\nunused = ["),
        ("sgx.debug = false", "sgx.debug = false\nsgx.debug = true"),
        ('key_name = "_sgx_mrenclave"', 'key_name = "_sgx_mrsigner"'),
        ('{ type = "encrypted", path = "/sealed"', '{ path = "/sealed"'),
        ('path = "/sealed"', 'path = "/keys"'),
    ],
)
def test_validation_catches_weakened_templates(old: str, new: str) -> None:
    template = TEMPLATE.read_text()
    assert old in template
    with pytest.raises(ConfigError):
        render_manifest(template.replace(old, new, 1), VALUES)


def test_leftover_template_syntax_is_refused() -> None:
    with pytest.raises(ConfigError):
        validate_manifest('sgx.debug = false\nx = "{{ y }}"\n')


@given(st.text(max_size=40))
def test_any_value_renders_safely_or_is_refused(value: str) -> None:
    try:
        manifest = validate_manifest(
            render_manifest(TEMPLATE.read_text(), {**VALUES, "app_dir": value})
        )
    except ConfigError:
        return
    assert manifest["sgx"]["debug"] is False
    assert f"file:{value}/" in manifest["sgx"]["trusted_files"]


@given(st.binary(max_size=300))
def test_arbitrary_manifest_bytes_only_raise_config_error(data: bytes) -> None:
    try:
        validate_manifest(data.decode("utf-8", "replace"))
    except ConfigError:
        return
