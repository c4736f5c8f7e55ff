"""Policy: validation at construction, the pinned Intel root, TOML loading."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.attestation import INTEL_ROOT_FINGERPRINT, MrSignerRule, Policy, intel_root_der
from secure_ci.exceptions import ConfigError

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "attestation"
MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
ISSUE_EXAMPLE = f"""
[attestation]
roots = ["intel"]
mrenclave = ["{MRENCLAVE}"]
mrsigner = []
isvprodid = 0
min_isvsvn = 0
mrtd = []
allow_debug = false
tcb_status = ["UpToDate", "SWHardeningNeeded"]
advisories = []
max_collateral_age_days = 30
"""


def test_default_policy_is_intel_pinned_and_strict() -> None:
    p = Policy()
    assert p.root_fingerprints() == (INTEL_ROOT_FINGERPRINT,)
    assert intel_root_der() == (VECTORS / "intel-sgx-root-ca.der").read_bytes()
    assert not p.allow_debug
    assert p.tcb_status == frozenset({"UpToDate"})
    assert not p.mrenclave
    assert not p.mrsigner
    assert not p.mrtd


def test_impostor_root_has_intels_name_but_not_its_fingerprint() -> None:
    impostor = x509.load_pem_x509_certificate(
        (VECTORS / "SYNTHETIC-intel-qvl-test-root-ca.pem").read_bytes()
    )
    intel = x509.load_der_x509_certificate(intel_root_der())
    assert impostor.subject == intel.subject
    impostor_der = impostor.public_bytes(Encoding.DER)
    assert hashlib.sha256(impostor_der).hexdigest() != INTEL_ROOT_FINGERPRINT
    assert Policy(roots=(impostor_der,)).root_fingerprints() != Policy().root_fingerprints()


def test_issue_example_loads() -> None:
    p = Policy.from_toml(ISSUE_EXAMPLE, base_dir=VECTORS)
    assert p.mrenclave == frozenset({bytes.fromhex(MRENCLAVE)})
    assert p.tcb_status == frozenset({"UpToDate", "SWHardeningNeeded"})
    assert p.max_collateral_age_days == 30
    assert p.digest == Policy.from_toml(ISSUE_EXAMPLE, base_dir=VECTORS).digest
    assert p.digest != Policy().digest


def test_pem_roots_relative_to_base_dir_and_tdx_lists() -> None:
    text = """
[attestation]
roots = ["intel", "SYNTHETIC-intel-qvl-test-root-ca.pem"]
mrsigner = ["0x00"]
"""
    with pytest.raises(ConfigError):
        Policy.from_toml(text, base_dir=VECTORS)
    text = f"""
[attestation]
roots = ["intel", "SYNTHETIC-intel-qvl-test-root-ca.pem"]
mrsigner = ["{"ab" * 32}"]
isvprodid = 7
min_isvsvn = 3
mrtd = ["{"cd" * 48}"]
rtmr0 = ["{"e0" * 48}"]
rtmr1 = ["{"e1" * 48}", "{"f1" * 48}"]
rtmr2 = ["{"ef" * 48}"]
rtmr3 = ["{"00" * 48}"]
advisories = ["*"]
require_nonce = true
"""
    p = Policy.from_toml(text, base_dir=VECTORS)
    assert len(p.roots) == 2
    assert p.roots[0] == intel_root_der()
    assert p.mrsigner == (MrSignerRule(bytes.fromhex("ab" * 32), 7, 3),)
    assert p.rtmrs[2] == frozenset({bytes.fromhex("ef" * 48)})
    assert len(p.rtmrs[1]) == 2
    assert not p.rtmr_any
    assert p.require_nonce
    assert "*" in p.advisories


MRTD = f'mrtd = ["{"cd" * 48}"]\n'
RTMRS = [f'rtmr{i} = ["{"e0" * 48}"]\n' for i in range(4)]


@pytest.mark.parametrize(
    ("body", "unpinned"),
    [
        (MRTD, "rtmr0, rtmr1, rtmr2, rtmr3 not pinned"),
        (MRTD + RTMRS[0] + RTMRS[1] + RTMRS[2], "rtmr3 not pinned"),
        (MRTD + RTMRS[1] + RTMRS[3], "rtmr0, rtmr2 not pinned"),
        (MRTD + "rtmr_any = false\n" + RTMRS[0], "rtmr1, rtmr2, rtmr3 not pinned"),
    ],
)
def test_tdx_policy_must_pin_rtmrs_or_say_any(body: str, unpinned: str) -> None:
    with pytest.raises(ConfigError, match=f"must pin every RTMR, {unpinned}.*rtmr_any = true"):
        Policy.from_toml(f"[attestation]\n{body}", base_dir=VECTORS)


def test_tdx_policy_rtmr_any_is_explicit_and_recorded() -> None:
    any_policy = Policy.from_toml(f"[attestation]\n{MRTD}rtmr_any = true\n", base_dir=VECTORS)
    pinned = Policy.from_toml(f"[attestation]\n{MRTD}{''.join(RTMRS)}", base_dir=VECTORS)
    assert any_policy.rtmr_any
    assert not any(any_policy.rtmrs)
    assert all(len(allowed) == 1 for allowed in pinned.rtmrs)
    assert any_policy.to_dict()["rtmr_any"] is True
    assert pinned.to_dict()["rtmr_any"] is False
    assert any_policy.digest != pinned.digest
    # without mrtd the policy accepts no TD, so nothing needs pinning
    assert not Policy.from_toml("[attestation]\n", base_dir=VECTORS).rtmr_any
    with pytest.raises(ConfigError, match="cannot be combined"):
        Policy.from_toml(f"[attestation]\n{MRTD}rtmr_any = true\n{RTMRS[3]}", base_dir=VECTORS)
    with pytest.raises(ConfigError, match="rtmr_any must be a bool"):
        Policy.from_toml(f"[attestation]\n{MRTD}rtmr_any = 1\n", base_dir=VECTORS)


def test_tdx_policy_construction_pins_rtmrs() -> None:
    mrtd = frozenset({bytes(48)})
    with pytest.raises(ConfigError, match="must pin every RTMR"):
        Policy(mrtd=mrtd)
    with pytest.raises(ConfigError, match="rtmr_any must be a boolean"):
        Policy(mrtd=mrtd, rtmr_any=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cannot be combined"):
        Policy(mrtd=mrtd, rtmr_any=True, rtmrs=(mrtd, frozenset(), frozenset(), frozenset()))
    assert Policy(mrtd=mrtd, rtmr_any=True).rtmr_any
    assert Policy(mrtd=mrtd, rtmrs=(mrtd,) * 4).rtmrs == (mrtd,) * 4


@pytest.mark.parametrize(
    "body",
    [
        "colour = 1",
        'mrenclave = ["zz"]',
        'mrenclave = ["abcd"]',
        'mrtd = ["' + "00" * 32 + '"]',
        "mrenclave = [1]",
        'mrenclave = "00"',
        "allow_debug = 1",
        'tcb_status = ["Revoked"]',
        "tcb_status = []",
        "max_collateral_age_days = 0",
        "max_collateral_age_days = true",
        "max_collateral_age_days = 99999",
        "isvprodid = 70000",
        "min_isvsvn = -1",
        "roots = []",
        'roots = ["missing.pem"]',
        'roots = ["EXPECTED.json"]',
        "roots = [1]",
        'advisories = [""]',
        "require_nonce = 'yes'",
    ],
)
def test_bad_attestation_tables(body: str) -> None:
    with pytest.raises(ConfigError):
        Policy.from_toml(f"[attestation]\n{body}\n", base_dir=VECTORS)


@pytest.mark.parametrize("text", ["", "attestation = 1", "[attestation", "x = [1, 2"])
def test_not_a_policy_document(text: str) -> None:
    with pytest.raises(ConfigError):
        Policy.from_toml(text, base_dir=VECTORS)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"roots": ()},
        {"roots": (b"not a cert",)},
        {"mrenclave": frozenset({b"short"})},
        {"mrtd": frozenset({bytes(32)})},
        {"rtmrs": (frozenset(),)},
        {"rtmrs": (frozenset({b"x"}), frozenset(), frozenset(), frozenset())},
        {"mrsigner": ("x",)},
        {"tcb_status": frozenset({"Revoked"})},
        {"max_collateral_age_days": 0},
    ],
)
def test_construction_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Policy(**kwargs)  # type: ignore[arg-type]


def test_mrsigner_rule_validates() -> None:
    with pytest.raises(ConfigError):
        MrSignerRule(bytes(31))
    with pytest.raises(ConfigError):
        MrSignerRule(bytes(32), isv_prod_id=1 << 16)


@given(st.text(max_size=400))
def test_arbitrary_text_only_config_errors(text: str) -> None:
    with contextlib.suppress(ConfigError):
        Policy.from_toml(text, base_dir=VECTORS)


_VALUES = st.recursive(
    st.none().map(lambda _: '""')
    | st.integers(-(2**70), 2**70).map(str)
    | st.booleans().map(lambda b: str(b).lower())
    | st.text(alphabet='0123456789abcdefxzUpToDate*"\\', max_size=100).map(lambda s: f'"{s}"')
    | st.sampled_from(['"intel"', f'"{MRENCLAVE}"', '"UpToDate"', '"' + "a" * 96 + '"']),
    lambda inner: st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
    max_leaves=8,
)
_KEYS = st.sampled_from(
    ["roots", "mrenclave", "mrsigner", "isvprodid", "min_isvsvn", "mrtd", "rtmr1", "rtmr_any",
     "allow_debug", "tcb_status", "advisories", "max_collateral_age_days", "require_nonce", "other"]
)  # fmt: skip


@given(st.dictionaries(_KEYS, _VALUES, max_size=6))
def test_tomlish_tables_only_config_errors(table: dict[str, str]) -> None:
    text = "[attestation]\n" + "".join(f"{k} = {v}\n" for k, v in table.items())
    try:
        p = Policy.from_toml(text, base_dir=VECTORS)
    except ConfigError:
        return
    assert p.roots
