"""What to do about a contract revert: one hint per custom error a user can cause."""

from __future__ import annotations

from secure_ci.exceptions import ContractRevertError

__all__ = ["REVERT_HINTS", "explain"]

REVERT_HINTS = {
    "OwnableUnauthorizedAccount": "only the deployment's owner may do this: sign with the owner"
    " key (the one `secure-ci ledger deploy` used)",
    "UnknownParty": "no such party on this chain: the deployment's owner adds it with"
    " `secure-ci ledger party add`",
    "NotPartyAdmin": "sign with the admin key of that party",
    "DeviceTaken": "the device is registered to another party",
    "EdgeTaken": "the edge key is registered to another party",
    "ModelTaken": "the model id is registered to another party",
    "UnknownDevice": "the device was never registered",
    "UnknownEdge": "the edge key is not registered, or revoked",
    "NoKeyPossession": "the proof of possession does not verify: it must be signed by the"
    " registered key itself, for this party, chain and contract",
    "MeasurementNotAllowed": "the deployment's owner allows it with"
    " `secure-ci ledger measurement allow`",
}


def explain(exc: BaseException) -> str:
    """``exc`` in one line, with what to do when it is a revert we know."""
    text = str(exc)
    if isinstance(exc, ContractRevertError):
        for name, hint in REVERT_HINTS.items():
            if name in text:
                return f"{text}: {hint}"
    return text
