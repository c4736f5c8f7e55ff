"""What to do about a contract revert: one hint per custom error a user can cause."""

from __future__ import annotations

from secure_ci.exceptions import ContractRevertError

__all__ = ["REVERT_HINTS", "explain"]

REVERT_HINTS = {
    "UnknownParty": "no such party on this chain: a party proposes it with"
    " `secure-ci ledger party add` and the parties approve it",
    "NotPartyAdmin": "sign with the admin key of that party",
    "DeviceTaken": "the device is registered to another party",
    "EdgeTaken": "the edge key is registered to another party",
    "ModelTaken": "the model id is registered to another party",
    "UnknownDevice": "the device was never registered",
    "UnknownEdge": "the edge key is not registered, or revoked",
    "NoKeyPossession": "the proof of possession does not verify: it must be signed by the"
    " registered key itself, for this party, chain and contract",
    "MeasurementNotAllowed": "the measurement is not an approved release, or it is suspended:"
    " see `secure-ci ledger release list`",
    "ZeroAddress": "the zero address cannot be registered or administer a party",
    # governance (k of n parties)
    "NotParty": "only a party's admin may propose, approve or suspend: sign with the admin key"
    " of a party (`secure-ci ledger status` lists the parties)",
    "InvalidThreshold": "the threshold must be between 1 and the number of founding parties"
    " (the deployer's included)",
    "AdminTaken": "that key already administers a party: one key, one party, one vote",
    "UnknownReleaseKind": "a release is a measurement (0) or a model (1)",
    "InvalidWindow": "a release's not-after must be later than its not-before",
    "TooManySources": "a release names at most 16 source digests",
    "ProposalExists": "the same action was proposed already: approve that proposal"
    " (`secure-ci ledger proposal list`)",
    "UnknownProposal": "no proposal with that id on this chain (`secure-ci ledger proposal list`)",
    "ProposalNotPending": "the proposal was executed already",
    "AlreadyApproved": "your party approved this proposal already: another party must approve",
    "NotEnoughApprovals": "the proposal needs more parties' approvals before it can be executed"
    " (`secure-ci ledger proposal approve ID` with another party's key)",
    "WindowEnded": "the notice period ends after the release's not-after: propose a longer window",
    "UnknownRelease": "no such release on this chain (`secure-ci ledger release list`)",
    "AlreadySuspended": "the release is suspended already",
    "NotSuspended": "the release is not suspended: there is nothing to lift",
    "ReleaseNotValid": "the edge's measurement is not a release valid now (not approved, in its"
    " notice period, expired or suspended): see `secure-ci ledger release list`",
}


def explain(exc: BaseException) -> str:
    """``exc`` in one line, with what to do when it is a revert we know."""
    text = str(exc)
    if isinstance(exc, ContractRevertError):
        for name, hint in REVERT_HINTS.items():
            if name in text:
                return f"{text}: {hint}"
    return text
