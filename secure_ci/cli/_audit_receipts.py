"""`secure-ci audit ... --receipts FILE`: device receipts read, verified and reported.

The file is read here (the CLI is the only place that reads files), at most
``MAX_RECEIPTS_FILE_BYTES`` + 1 bytes of it, and handed to ``parse_receipts``: every receipt's
signatures must verify before anything is compared, so a hostile file is an error naming
the file and the receipt (exit 1), never a finding against an edge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from secure_ci.exceptions import ConfigError, RecordError, SignatureError

__all__ = ["chain_time", "load_receipts", "omission_row"]


def load_receipts(idx: Any, path: Path | None) -> None:
    """Read, validate and verify a receipts file into the index (RecordError/SignatureError
    naming the receipt; nothing is loaded unless every receipt verifies)."""
    if path is None:
        return
    from secure_ci.ledger._audit_receipts import MAX_RECEIPTS_FILE_BYTES, parse_receipts

    try:
        with path.open("rb") as f:
            data = f.read(MAX_RECEIPTS_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read receipts file {path}: {exc.strerror or exc}") from exc
    try:
        idx.add_receipts(parse_receipts(data, idx.domain))
    except SignatureError as exc:
        raise SignatureError(f"receipts file {path}: {exc}") from exc
    except RecordError as exc:
        raise RecordError(f"receipts file {path}: {exc}") from exc


async def chain_time(idx: Any, ledger: Any) -> int:
    """The time receipt windows are judged at: the chain's latest block, or without a chain
    the latest anchoring the index knows (fewer omissions, never more)."""
    if ledger is not None:
        return int(await ledger.timestamp())
    return int(idx.last_anchored_at())


def omission_row(receipt: Any, finding: Any) -> dict[str, Any]:
    """An export row for a receipt's task that was never anchored (the task row's keys)."""
    out: dict[str, Any] = {"edge": "0x" + receipt.edge.hex(), "batch_id": -1}
    for obj in (receipt.request, receipt.result):
        for name in type(obj).__slots__:
            value = getattr(obj, name)
            out[name] = "0x" + value.hex() if isinstance(value, bytes) else value
    out["device_sig"] = "0x" + receipt.device_sig.hex()
    out["chain_next_seq"] = -1
    out["anchored_at"] = -1
    out["findings"] = [{"code": str(finding.code), "message": finding.message}]
    return out
