"""Collateral bundles: validation, validity window, file and PCCS sources with caching."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.attestation import Collateral, FileCollateral, PccsCollateral
from secure_ci.attestation._collateral import MAX_COLLATERAL_BYTES
from secure_ci.exceptions import AttestationError, CollateralError, EvidenceFormatError

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "attestation"
SGX_BUNDLE = (VECTORS / "sgx-v3-dcapqvl-sample.collateral.json").read_text()


def _ts(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def test_window_and_digest(sgx_collateral: Collateral) -> None:
    # oldest of tcb_info / qe_identity issueDate and pck_crl thisUpdate; earliest nextUpdate
    assert sgx_collateral.issue_date == _ts("2025-06-19T10:01:18")
    assert sgx_collateral.next_update == _ts("2025-07-19T10:01:18")
    again = Collateral.from_json(sgx_collateral.json.encode())
    assert again == sgx_collateral
    assert again.digest == sgx_collateral.digest
    assert len(sgx_collateral.digest) == 64
    assert sgx_collateral.to_qvl().tcb_info == json.loads(SGX_BUNDLE)["tcb_info"]


def test_tdx_collateral_differs(sgx_collateral: Collateral, tdx_collateral: Collateral) -> None:
    assert tdx_collateral.digest != sgx_collateral.digest


def test_check_fresh(sgx_collateral: Collateral) -> None:
    sgx_collateral.check_fresh(sgx_collateral.issue_date)
    with pytest.raises(CollateralError, match="not yet valid"):
        sgx_collateral.check_fresh(sgx_collateral.issue_date - 1)
    with pytest.raises(CollateralError, match="expired"):
        sgx_collateral.check_fresh(sgx_collateral.next_update + 1)


def _edit(**changes: object) -> str:
    value = json.loads(SGX_BUNDLE)
    for key, new in changes.items():
        if new is None:
            del value[key]
        else:
            value[key] = new
    return json.dumps(value)


def _tcb_with(**fields: str) -> str:
    tcb = json.loads(json.loads(SGX_BUNDLE)["tcb_info"])
    tcb.update(fields)
    return json.dumps(tcb)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("[]", id="not-object"),
        pytest.param("{" * 5000, id="deep"),
        pytest.param(_edit(pck_crl=None), id="missing-key"),
        pytest.param(_edit(extra="x"), id="extra-key"),
        pytest.param(_edit(tcb_info=5), id="non-string"),
        pytest.param(_edit(pck_crl="zz"), id="crl-not-hex"),
        pytest.param(_edit(root_ca_crl="3000"), id="crl-not-der"),
        pytest.param(_edit(tcb_info="{"), id="tcb-not-json"),
        pytest.param(_edit(tcb_info="[]"), id="tcb-not-object"),
        pytest.param(_edit(tcb_info=_tcb_with(issueDate="yesterday")), id="bad-date"),
        pytest.param(_edit(qe_identity="{}"), id="no-dates"),
        pytest.param(
            _edit(tcb_info=_tcb_with(nextUpdate="2020-01-01T00:00:00Z")), id="ends-before-start"
        ),
        pytest.param(" " * (MAX_COLLATERAL_BYTES + 1), id="oversized"),
    ],
)
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(EvidenceFormatError):
        Collateral.from_json(text)


@given(
    st.dictionaries(
        st.sampled_from([*json.loads(SGX_BUNDLE), "x"]),
        st.text(max_size=40) | st.integers() | st.none(),
        max_size=10,
    )
)
def test_arbitrary_bundles_only_format_errors(value: dict[str, object]) -> None:
    base = json.loads(SGX_BUNDLE)
    base.update(value)
    with contextlib.suppress(EvidenceFormatError):
        Collateral.from_json(json.dumps(base))


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_format_errors(data: bytes) -> None:
    with pytest.raises(EvidenceFormatError):
        Collateral.from_json(data)


def test_file_source_caches_until_next_update(tmp_path: Path, sgx_collateral: Collateral) -> None:
    path = tmp_path / "bundle.json"
    path.write_text(SGX_BUNDLE)
    source = FileCollateral(path)
    t = sgx_collateral.issue_date + 10
    assert source.get(t) == sgx_collateral
    assert source.get(t + 3600) == sgx_collateral
    assert source.loads == 1
    with pytest.raises(CollateralError, match="expired"):
        source.get(sgx_collateral.next_update + 1)
    assert source.loads == 2
    with pytest.raises(CollateralError, match="cannot read"):
        FileCollateral(tmp_path / "missing.json").get(t)


def test_pccs_source_with_injected_fetch(sgx_collateral: Collateral) -> None:
    calls: list[str] = []

    def fetch(url: str) -> bytes:
        calls.append(url)
        return SGX_BUNDLE.encode()

    source = PccsCollateral("https://pccs.invalid/bundle", fetch=fetch)
    t = sgx_collateral.issue_date
    for step in range(5):
        assert source.get(t + step * 86_400) == sgx_collateral
    assert calls == ["https://pccs.invalid/bundle"]
    with pytest.raises(CollateralError, match="expired"):
        source.get(sgx_collateral.next_update + 1)
    assert len(calls) == 2


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []  # noqa: RUF012

    def do_GET(self) -> None:
        self.hits.append(self.path)
        if self.path != "/sgx/bundle.json":
            self.send_error(404)
            return
        body = SGX_BUNDLE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def pccs_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_pccs_over_loopback_http(pccs_server: str, sgx_collateral: Collateral) -> None:
    _Handler.hits.clear()
    source = PccsCollateral(f"{pccs_server}/sgx/bundle.json")
    t = sgx_collateral.issue_date + 60
    assert source.get(t) == sgx_collateral
    assert source.get(t + 60) == sgx_collateral
    assert _Handler.hits == ["/sgx/bundle.json"]
    with pytest.raises(CollateralError, match="cannot fetch"):
        PccsCollateral(f"{pccs_server}/missing").get(t)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://x/y", "http://127.0.0.1:1/x"])
def test_pccs_bad_urls(url: str) -> None:
    with pytest.raises(AttestationError):
        PccsCollateral(url).get(0)
