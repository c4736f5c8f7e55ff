"""Verify a real Intel-signed SGX quote with its collateral under a policy (dcap-qvl inside).

Run: .venv/bin/python examples/verify_intel_quote.py
"""

from __future__ import annotations

from pathlib import Path

from secure_ci.attestation import Collateral, Policy, verify_quote
from secure_ci.exceptions import AttestationError

VECTORS = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "attestation"
SAMPLE_TIME = 1750400000  # the sample's collateral is valid in June/July 2025


def main() -> None:
    quote = (VECTORS / "sgx-v3-dcapqvl-sample.bin").read_bytes()
    collateral = Collateral.from_json(
        (VECTORS / "sgx-v3-dcapqvl-sample.collateral.json").read_text()
    )
    mrenclave = bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
    # The sample platform needs configuration and SW hardening (its TCB status says so):
    # accept that explicitly, with any advisory, as a verifier for a test fleet might.
    policy = Policy(
        mrenclave=frozenset({mrenclave}),
        tcb_status=frozenset(
            {"UpToDate", "SWHardeningNeeded", "ConfigurationAndSWHardeningNeeded"}
        ),
        advisories=frozenset({"*"}),
    )
    enclave = verify_quote(quote, collateral=collateral, policy=policy, now=SAMPLE_TIME)
    print(
        f"accepted: {enclave.tee} mrenclave {enclave.mrenclave.hex()[:16]}.. "
        f"tcb {enclave.tcb_status} quote_id {enclave.quote_id[:16]}.."
    )
    try:
        verify_quote(quote, collateral=collateral, policy=Policy(), now=SAMPLE_TIME)
    except AttestationError as exc:
        print(f"refused under the default policy: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
