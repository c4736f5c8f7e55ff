"""The deployment file: one canonical JSON form, parsed strictly."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_ci.exceptions import ConfigError
from secure_ci.ledger._deployment import DEPLOYMENT_FORMAT, Deployment

GOOD = Deployment(
    31337, bytes.fromhex("5fbdb2315678afecb367f032d93f642f64180aa3"), 1, "http://127.0.0.1:8545"
)


def test_round_trip_and_domain() -> None:
    text = GOOD.to_json()
    assert Deployment.from_json(text) == GOOD
    assert Deployment.from_json(text.encode()) == GOOD
    assert json.loads(text)["contract"] == "0x5FbDB2315678afecb367f032d93F642f64180aa3"
    assert GOOD.domain.chain_id == 31337
    assert GOOD.domain.contract == GOOD.contract


def _doc(**changes: object) -> str:
    doc: dict[str, object] = json.loads(GOOD.to_json())
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not ...})


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not JSON"),
        ("[]", "exactly the keys"),
        (_doc(extra=1), "exactly the keys"),
        (_doc(rpc=...), "exactly the keys"),
        (_doc(format="secure-ci/deployment/v0"), "unknown deployment format"),
        (_doc(chain_id=0), "chain_id must not be 0"),
        (_doc(chain_id=True), "whole number"),
        (_doc(chain_id=-1), "whole number"),
        (_doc(deployment_block=1.5), "whole number"),
        (_doc(contract="0x" + "00" * 20), "zero address"),
        (_doc(contract="0x5FBDB2315678afecb367f032d93F642f64180aa3"), "checksum"),
        (_doc(contract="5fbdb2315678afecb367f032d93f642f64180aa3"), "0x address"),
        (_doc(contract="0x" + "zz" * 20), "0x address"),
        (_doc(rpc="ftp://x"), "http"),
        (_doc(rpc="http://"), "http"),
        ("[" * 3000, "not JSON"),
        (_doc(rpc="http://[::1"), "http"),
        (" " * 5000, "at most"),
    ],
)
def test_malformed_deployments_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        Deployment.from_json(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_raise_config_error(data: bytes) -> None:
    with contextlib.suppress(ConfigError):
        Deployment.from_json(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(GOOD.to_json()) - 1), st.characters(codec="ascii"))
def test_one_changed_character_is_refused_or_still_a_deployment(index: int, char: str) -> None:
    text = GOOD.to_json()
    mutated = text[:index] + char + text[index + 1 :]
    try:
        found = Deployment.from_json(mutated)
    except ConfigError:
        return
    assert found.to_json() == Deployment.from_json(found.to_json()).to_json()
    assert DEPLOYMENT_FORMAT in mutated
