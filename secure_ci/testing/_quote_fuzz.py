"""Mutation fuzzing of DCAP quotes: every region, truncations, length fields, swapped sections.

:func:`mutate_quote` generates mutants; :func:`fuzz_verifier` runs a verifier over them and
sorts each outcome. A mutant the verifier accepts is a *forgery* unless the verified result is
identical to the original's (same quote id, measurements, report data, PCK leaf, TCB): then
only unsigned bytes changed (the root copy at the end of the PEM chain, PEM whitespace),
which dcap-qvl ignores by design and which never reach the ledger (quote ids hash the signed
region). With our strict chain parsing (the root copy must be the trusted anchor, PEM must be
canonical) none are expected; the category stays so that any slack is visible, not hidden.
The target is ``forged == 0`` and ``crashed == 0``.
"""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice

from secure_ci.exceptions import AttestationError, ConfigError

__all__ = ["FuzzReport", "fuzz_verifier", "mutate_quote", "quote_regions"]

_V3_FIXED = (
    ("header", 48),
    ("isv_body", 384),
    ("sig_data_len", 4),
    ("isv_sig", 64),
    ("att_key", 64),
    ("qe_report", 384),
    ("qe_sig", 64),
    ("qe_auth_size", 2),
)


def quote_regions(quote: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of an SGX v3 quote's sections (coarser for other layouts)."""
    regions: dict[str, tuple[int, int]] = {}
    pos = 0
    if quote[:2] != b"\x03\x00" or len(quote) < 1020:
        split = min(48, len(quote))
        return {
            k: v for k, v in (("header", (0, split)), ("rest", (split, len(quote)))) if v[1] > v[0]
        }
    for name, size in _V3_FIXED:
        regions[name] = (pos, pos + size)
        pos += size
    (auth_len,) = struct.unpack_from("<H", quote, pos - 2)
    regions["qe_auth"] = (pos, min(pos + auth_len, len(quote)))
    pos = regions["qe_auth"][1]
    regions["cert_type"] = (pos, min(pos + 2, len(quote)))
    regions["cert_size"] = (min(pos + 2, len(quote)), min(pos + 6, len(quote)))
    regions["cert_data"] = (min(pos + 6, len(quote)), len(quote))
    return {k: v for k, v in regions.items() if v[1] > v[0]}


def _flip(quote: bytes, start: int, end: int, rng: random.Random) -> bytes:
    out = bytearray(quote)
    out[rng.randrange(start, end)] ^= 1 << rng.randrange(8)
    return bytes(out)


def _set_field(quote: bytes, start: int, end: int, value: int) -> bytes:
    width = end - start
    return quote[:start] + (value % (1 << (8 * width))).to_bytes(width, "little") + quote[end:]


def _swap(quote: bytes, a: tuple[int, int], b: tuple[int, int]) -> bytes:
    if a[1] - a[0] != b[1] - b[0] or a[1] > b[0]:
        return quote
    return (
        quote[: a[0]] + quote[b[0] : b[1]] + quote[a[1] : b[0]] + quote[a[0] : a[1]] + quote[b[1] :]
    )


def _round(quote: bytes, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """One pass: a flip in every region, a truncation, a length edit, a swap, an append."""
    regions = quote_regions(quote)
    for name, (start, end) in regions.items():
        yield f"flip:{name}", _flip(quote, start, end, rng)
    cut = rng.choice([rng.randrange(len(quote)), *[s for s, _ in regions.values()]])
    yield "truncate", quote[:cut]
    lengths = [
        n for n in ("sig_data_len", "qe_auth_size", "cert_size", "cert_type") if n in regions
    ]
    if lengths:
        name = rng.choice(lengths)
        start, end = regions[name]
        current = int.from_bytes(quote[start:end], "little")
        delta = rng.choice([1, -1, 2, -64, 1000, -current, 1 << 31])
        yield f"length:{name}", _set_field(quote, start, end, current + delta)
    pairs = [("isv_sig", "qe_sig"), ("isv_body", "qe_report"), ("att_key", "isv_sig")]
    present = [(a, b) for a, b in pairs if a in regions and b in regions]
    if present:
        a, b = rng.choice(present)
        swapped = _swap(quote, regions[a], regions[b])
        yield f"swap:{a}/{b}", swapped
    yield "append", quote + rng.randbytes(rng.randrange(1, 65))


def mutate_quote(quote: bytes, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """An endless stream of ``(kind:region, mutant)``; take as many as needed with islice."""
    if not quote:
        raise ConfigError("cannot mutate an empty quote")
    while True:
        for kind, mutant in _round(quote, rng):
            if mutant != quote:
                yield kind, mutant


@dataclass
class FuzzReport:
    """Outcome counts of a fuzz run; ``forged`` and ``crashed`` must stay empty."""

    tried: int = 0
    rejected: int = 0
    accepted_benign: Counter[str] = field(default_factory=Counter)
    forged: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)
    by_kind: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, object]:
        return {
            "tried": self.tried,
            "rejected": self.rejected,
            "accepted": len(self.forged),
            "accepted_unsigned_bytes_only": sum(self.accepted_benign.values()),
            "accepted_unsigned_by_region": dict(sorted(self.accepted_benign.items())),
            "crashed": len(self.crashed),
        }


def fuzz_verifier(
    quote: bytes, verify: Callable[[bytes], object], *, count: int, rng: random.Random
) -> FuzzReport:
    """Run ``verify`` over ``count`` mutants of ``quote`` (which it must accept)."""
    baseline = verify(quote)
    report = FuzzReport()
    for kind, mutant in islice(mutate_quote(quote, rng), count):
        report.tried += 1
        report.by_kind[kind.split(":")[0]] += 1
        try:
            result = verify(mutant)
        except AttestationError:
            report.rejected += 1
            continue
        except Exception as exc:  # a crash is a finding: recorded, not raised
            report.crashed.append(f"{kind}: {type(exc).__name__}: {exc}")
            continue
        if result == baseline:
            report.accepted_benign[kind] += 1
        else:
            report.forged.append(kind)
    return report
