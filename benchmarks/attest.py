"""Attestation benchmark: quote verification latency, RA-TLS cost, evidence size, mutation fuzzing.

Verification uses cached collateral (parsed once), for a dev-PKI quote and for the real Intel
SGX sample at its pinned clock. ``qvl_ms`` is bare dcap-qvl on the same input, so
``policy_overhead_ratio`` shows what our parsing and policy add. Mutants are sorted as in
``secure_ci.testing._quote_fuzz``: ``accepted`` counts forgeries (must be 0); mutants that only
changed unsigned bytes and verify to an identical result are reported apart.
Sizes (timed runs, dev mutants, Intel-sample mutants): ``full`` (2000, 7000, 3000), ``quick``
(200, 300, 200), ``smoke`` (30, 40, 30).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dcap_qvl

from secure_ci.attestation import (
    Collateral,
    Policy,
    fresh_evidence,
    make_ratls_certificate,
    spki_der_of,
    verify_quote,
    verify_ratls_certificate,
)
from secure_ci.testing import DEV_NOW, dev_pki, dev_policy, dev_provider, fuzz_verifier

VECTORS = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "attestation"
SAMPLE_NOW = 1_750_500_000  # inside the sample collateral's window (2025-06-19..07-19)
SAMPLE_POLICY = Policy(
    mrenclave=frozenset(
        {bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")}
    ),
    tcb_status=frozenset({"ConfigurationAndSWHardeningNeeded"}),
    advisories=frozenset({"INTEL-SA-00289", "INTEL-SA-00615"}),
)
TARGETS = {"verify_p95_ms": 5.0, "evidence_bytes": 6 * 1024, "accepted": 0}
SIZES = {"smoke": (30, 40, 30), "quick": (200, 300, 200), "full": (2000, 7000, 3000)}


def _timed_ms(fn: Callable[[], object], runs: int) -> dict[str, float]:
    """Wall-clock p50/p95, plus this thread's CPU time p95 (robust to a loaded machine)."""
    fn()  # warm
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.thread_time() - start_cpu) * 1000)
    wall.sort()
    cpu.sort()
    return {
        "p50": round(statistics.median(wall), 4),
        "p95": round(wall[int(0.95 * (len(wall) - 1))], 4),
        "cpu_p95": round(cpu[int(0.95 * (len(cpu) - 1))], 4),
        "runs": runs,
    }


def _sample() -> tuple[bytes, Collateral]:
    quote = (VECTORS / "sgx-v3-dcapqvl-sample.bin").read_bytes()
    return quote, Collateral.from_json(
        (VECTORS / "sgx-v3-dcapqvl-sample.collateral.json").read_text()
    )


def run(*, quick: bool, size: str | None = None) -> dict[str, Any]:
    """Measure at ``size`` (``smoke``, ``quick``, ``full``; default from ``quick``)."""
    name = size or ("quick" if quick else "full")
    runs, dev_mutants, real_mutants = SIZES[name]
    pki = dev_pki()
    provider, policy, collateral = dev_provider(pki), dev_policy(pki), pki.collateral
    quote = provider.quote(bytes(64))
    qvl_collateral = collateral.to_qvl()
    sample_quote, sample_collateral = _sample()

    def verify_dev(q: bytes) -> Any:
        return verify_quote(q, collateral=collateral, policy=policy, now=DEV_NOW)

    def verify_sample(q: bytes) -> Any:
        return verify_quote(q, collateral=sample_collateral, policy=SAMPLE_POLICY, now=SAMPLE_NOW)

    dev_ms = _timed_ms(lambda: verify_dev(quote), runs)
    qvl_ms = _timed_ms(
        lambda: dcap_qvl.verify_with_root_ca(quote, qvl_collateral, pki.root_der, DEV_NOW), runs
    )
    sample_ms = _timed_ms(lambda: verify_sample(sample_quote), runs)
    creds = make_ratls_certificate(provider, now=DEV_NOW)
    cert_ms = _timed_ms(lambda: make_ratls_certificate(provider, now=DEV_NOW), runs // 4)
    cert_verify_ms = _timed_ms(
        lambda: verify_ratls_certificate(
            creds.cert_der, collateral=collateral, policy=policy, now=DEV_NOW
        ),
        runs,
    )
    fresh = fresh_evidence(provider, spki_der_of(creds.key), b"nonce")
    dev_fuzz = fuzz_verifier(quote, verify_dev, count=dev_mutants, rng=random.Random(1))
    real_fuzz = fuzz_verifier(sample_quote, verify_sample, count=real_mutants, rng=random.Random(2))
    worst_p95 = max(dev_ms["p95"], sample_ms["p95"])
    accepted = len(dev_fuzz.forged) + len(real_fuzz.forged)
    return {
        "verify_ms": {
            "p50": dev_ms["p50"],
            "p95": worst_p95,
            "cpu_p95": max(dev_ms["cpu_p95"], sample_ms["cpu_p95"]),
        },
        "verify_dev_ms": dev_ms,
        "verify_intel_sample_ms": sample_ms,
        "qvl_only_ms": qvl_ms,
        "policy_overhead_ratio": round(dev_ms["p50"] / qvl_ms["p50"], 3),
        "ratls_cert_ms": cert_ms["p50"],
        "ratls_cert_make_ms": cert_ms,
        "ratls_cert_verify_ms": cert_verify_ms,
        "evidence_bytes": len(creds.cert_der),
        "quote_bytes": len(quote),
        "fresh_quote_bytes": len(fresh),
        "mutations": {
            "tried": dev_fuzz.tried + real_fuzz.tried,
            "accepted": accepted,
            "crashed": len(dev_fuzz.crashed) + len(real_fuzz.crashed),
            "dev_quote": dev_fuzz.summary(),
            "intel_sample": real_fuzz.summary(),
        },
        "targets": TARGETS,
        "meets_targets": worst_p95 <= TARGETS["verify_p95_ms"]
        and len(creds.cert_der) <= TARGETS["evidence_bytes"]
        and accepted == 0,
        "size": name,
        "quick": name != "full",
    }


_LATENCIES = {
    "verify_dev_ms": "verify (dev quote)",
    "verify_intel_sample_ms": "verify (Intel SGX sample)",
    "qvl_only_ms": "dcap-qvl alone (dev quote)",
    "ratls_cert_verify_ms": "RA-TLS certificate verify",
    "ratls_cert_make_ms": "RA-TLS certificate make",
}


def plot(result: dict[str, Any], path: Path) -> None:
    """Latency p50/p95 per operation against the target, and mutation-fuzzing outcomes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), width_ratios=(3, 2))
    labels = [label for key, label in _LATENCIES.items() if key in result]
    rows = [result[key] for key in _LATENCIES if key in result]
    ys = range(len(rows))
    left.barh([y - 0.2 for y in ys], [r["p50"] for r in rows], height=0.4, label="p50")
    left.barh([y + 0.2 for y in ys], [r["p95"] for r in rows], height=0.4, label="p95")
    left.axvline(TARGETS["verify_p95_ms"], color="red", linestyle=":", label="verify p95 target")
    left.set_yticks(list(ys), labels)
    left.invert_yaxis()
    left.set_xlabel("ms (wall clock, cached collateral)")
    left.set_title("Attestation latency")
    left.legend(fontsize=8)
    fuzz = result["mutations"]
    kinds = ("rejected", "accepted_unsigned_bytes_only", "accepted", "crashed")
    names = ("dev_quote", "intel_sample")
    bottom = [0] * len(names)
    for kind in kinds:
        counts = [fuzz[name][kind] for name in names]
        right.bar(names, counts, bottom=bottom, label=kind.replace("_", " "))
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    right.set_ylim(0, 1.4 * max(bottom))  # room for the legend above the bars
    right.set_ylabel("mutants")
    right.set_title(f"Mutated quotes: {fuzz['accepted']} forgeries of {fuzz['tried']}")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
