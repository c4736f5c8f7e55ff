"""`secure-ci attest ...`: verify and simulate enclave evidence."""

from __future__ import annotations

import base64
import binascii
import json
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from secure_ci.exceptions import AttestationError, ConfigError

app = typer.Typer(
    help="Verify and simulate enclave evidence (SGX/TDX quotes, RA-TLS certificates).",
    no_args_is_help=True,
)

_MAX_INPUT = 1 << 20


def _usage(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _read(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_INPUT + 1)
    except OSError as exc:
        _usage(f"cannot read {what} {path}: {exc.strerror or exc}")
    if len(data) > _MAX_INPUT:
        _usage(f"{what} {path} is larger than {_MAX_INPUT} bytes")
    return data


def _decode_evidence(data: bytes) -> tuple[str, bytes]:
    """Classify QUOTE file content: ("quote", raw) or ("cert", DER)."""
    if data[:2] in (b"\x03\x00", b"\x04\x00", b"\x05\x00"):
        return "quote", data
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN CERTIFICATE-----"):
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        try:
            return "cert", x509.load_pem_x509_certificate(stripped).public_bytes(Encoding.DER)
        except ValueError as exc:
            raise AttestationError(f"PEM certificate cannot be parsed: {exc}") from exc
    try:
        return "quote", bytes.fromhex(stripped.removeprefix(b"0x").decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        pass
    try:
        return "quote", base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        pass
    return ("cert" if data[:1] == b"\x30" else "quote"), data


def _verify_evidence(kind: str, evidence: bytes, collateral: Any, policy: Any, now: int) -> Any:
    from secure_ci.attestation import verify_quote

    if kind == "quote":
        return verify_quote(evidence, collateral=collateral, policy=policy, now=now)
    try:
        from secure_ci.attestation import verify_ratls_certificate
    except ImportError:
        _usage("RA-TLS certificates are not supported by this build")
    return verify_ratls_certificate(evidence, collateral=collateral, policy=policy, now=now)


@app.command()
def verify(
    quote: Annotated[Path, typer.Argument(help="Quote (binary, hex, base64) or RA-TLS cert.")],
    collateral: Annotated[
        Path | None, typer.Option(help="Collateral bundle (dcap-qvl JSON).")
    ] = None,
    at: Annotated[int | None, typer.Option(help="Verification time, Unix seconds.")] = None,
    policy: Annotated[
        Path | None, typer.Option(help="Policy TOML with an [attestation] table.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Verify enclave evidence: exit 0 accepted, 1 rejected (with the reason), 2 usage error.

    Zero padding after a quote's signature data (as TDX quote buffers carry) is accepted up to
    a bound; any other byte there is refused.
    """
    from secure_ci.attestation import Collateral, Policy

    if collateral is None:
        _usage(
            "collateral is needed to verify a quote (TCB info, QE identity, CRLs): pass "
            "--collateral BUNDLE.json, the JSON dcap-qvl serialises"
        )
    evidence = _read(quote, "quote")
    bundle = _read(collateral, "collateral")
    try:
        the_policy = (
            Policy()
            if policy is None
            else Policy.from_toml(
                _read(policy, "policy").decode("utf-8", "replace"), base_dir=policy.parent
            )
        )
    except ConfigError as exc:
        _usage(f"bad policy: {exc}")
    try:
        the_collateral = Collateral.from_json(bundle)
    except AttestationError as exc:
        _usage(f"bad collateral {collateral}: {exc}")
    now = int(time.time()) if at is None else at
    try:
        kind, raw = _decode_evidence(evidence)
        enclave = _verify_evidence(kind, raw, the_collateral, the_policy, now)
    except AttestationError as exc:
        if as_json:
            reason = {"accepted": False, "error": type(exc).__name__, "reason": str(exc)}
            typer.echo(json.dumps(reason))
        typer.echo(f"rejected: {type(exc).__name__}: {exc}", err=as_json)
        raise typer.Exit(1) from exc
    fields = enclave.to_dict()
    if as_json:
        typer.echo(json.dumps({"accepted": True, **fields}, indent=2))
        return
    typer.echo("accepted")
    for key, value in fields.items():
        if value not in ("", []):
            typer.echo(f"  {key}: {value}")


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Directory for the dev artefacts.")],
    mrenclave: Annotated[
        str | None, typer.Option(help="MRENCLAVE as 64 hex digits (default: a dev value).")
    ] = None,
    debug: Annotated[bool, typer.Option(help="Mint a debug-enclave quote.")] = False,
    at: Annotated[int | None, typer.Option(help="Clock of the dev PKI, Unix seconds.")] = None,
) -> None:
    """Write a dev root, collateral, a policy trusting them, a quote and an RA-TLS certificate."""
    from secure_ci.attestation import DevPKI, make_ratls_certificate
    from secure_ci.testing import DEV_MRENCLAVE, dev_provider

    try:
        measurement = DEV_MRENCLAVE if mrenclave is None else bytes.fromhex(mrenclave)
    except ValueError:
        _usage("--mrenclave must be 64 hex digits")
    if len(measurement) != 32:
        _usage("--mrenclave must be 64 hex digits")
    now = int(time.time()) if at is None else at
    pki = DevPKI.generate(now)
    provider = dev_provider(pki, mrenclave=measurement, debug=debug)
    creds = make_ratls_certificate(provider, now=now)
    policy = (
        f"# Dev policy from `secure-ci attest simulate` (clock {now}): trusts ONLY this dev\n"
        "# root (NOT INTEL). Never use it in production.\n[attestation]\n"
        f'roots = ["root.pem"]\nmrenclave = ["{measurement.hex()}"]\nallow_debug = false\n'
        'tcb_status = ["UpToDate"]\nmax_collateral_age_days = 30\n'
    )
    files = {
        "root.pem": pki.root_pem.encode(),
        "collateral.json": pki.collateral_json.encode(),
        "policy.toml": policy.encode(),
        "quote.bin": provider.quote(bytes(64)),
        "cert.pem": creds.cert_pem.encode(),
        "key.pem": creds.key_pem.encode(),
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (out / name).write_bytes(data)
    except OSError as exc:
        _usage(f"cannot write to {out}: {exc.strerror or exc}")
    typer.echo(f"wrote {', '.join(files)} to {out}" + (" (debug enclave)" if debug else ""))
    typer.echo("verify them with:")
    for evidence in ("quote.bin", "cert.pem"):
        typer.echo(
            f"  secure-ci attest verify {out / evidence} --collateral {out / 'collateral.json'} "
            f"--policy {out / 'policy.toml'} --at {now}"
        )
