"""The shared ledger: contract binding (web3), chain backends, records, batches and audit.

``open_ledger`` connects to the in-process EVM or a JSON-RPC node and binds (or deploys) the
SecureCILedger contract; ``run_anvil`` starts the pinned anvil for tests and ``ledger up``.
"""

from __future__ import annotations

from secure_ci.ledger._anchor import Anchorer
from secure_ci.ledger._anvil import AnvilNode, find_anvil, run_anvil
from secure_ci.ledger._artifacts import ContractArtifact, decode_revert, load_artifact
from secure_ci.ledger._audit import AuditIndex, IndexedTask, VerifiedTask
from secure_ci.ledger._backends import INPROCESS
from secure_ci.ledger._calldata import AnchoredRecord, BatchRecords, decode_batch, encode_batch
from secure_ci.ledger._canonical import (
    CANONICAL_TAG,
    OutputOpening,
    canonical_digest,
    open_output,
    payload_digest,
)
from secure_ci.ledger._chain import (
    AnchorReceipt,
    BatchAnchoredEvent,
    BatchInfo,
    ChallengeInfo,
    DisputeInfo,
    EdgeInfo,
    EdgeState,
)
from secure_ci.ledger._client import LedgerClient
from secure_ci.ledger._connect import (
    DEFAULT_CHALLENGE_WINDOW,
    GovernanceSettings,
    deploy_contract,
    open_ledger,
)
from secure_ci.ledger._deployment import Deployment
from secure_ci.ledger._epoch import (
    AnchoredHead,
    EpochLink,
    EpochState,
    EpochStore,
    MemoryEpochStore,
    SealedEpochStore,
)
from secure_ci.ledger._governance import (
    RELEASE_MEASUREMENT,
    RELEASE_MODEL,
    GovernanceTx,
    ProposalInfo,
    ReleaseInfo,
    proposal_id,
)
from secure_ci.ledger._integrity import (
    REFUSAL_NOT_RECEIVED,
    BatchFault,
    RequestChallengeInfo,
    refusal_digest,
)
from secure_ci.ledger._journal import Batch, Journal, JournalEntry, sign_entry
from secure_ci.ledger._merkle import MerkleTree, chain_head, leaf_hash, verify_proof
from secure_ci.ledger._receipts import Receipt, ReceiptBook, find_receipt
from secure_ci.ledger._records import (
    KeyRegistration,
    LedgerDomain,
    Signer,
    TaskRequest,
    TaskResult,
    address_of,
    commitment,
    new_salt,
    recover_signer,
    sign_digest,
    task_id_for,
)
from secure_ci.ledger._releases import ReleaseCache, ReleaseView

__all__ = [
    "CANONICAL_TAG",
    "DEFAULT_CHALLENGE_WINDOW",
    "INPROCESS",
    "REFUSAL_NOT_RECEIVED",
    "RELEASE_MEASUREMENT",
    "RELEASE_MODEL",
    "AnchorReceipt",
    "AnchoredHead",
    "AnchoredRecord",
    "Anchorer",
    "AnvilNode",
    "AuditIndex",
    "Batch",
    "BatchAnchoredEvent",
    "BatchFault",
    "BatchInfo",
    "BatchRecords",
    "ChallengeInfo",
    "ContractArtifact",
    "Deployment",
    "DisputeInfo",
    "EdgeInfo",
    "EdgeState",
    "EpochLink",
    "EpochState",
    "EpochStore",
    "GovernanceSettings",
    "GovernanceTx",
    "IndexedTask",
    "Journal",
    "JournalEntry",
    "KeyRegistration",
    "LedgerClient",
    "LedgerDomain",
    "MemoryEpochStore",
    "MerkleTree",
    "OutputOpening",
    "ProposalInfo",
    "Receipt",
    "ReceiptBook",
    "ReleaseCache",
    "ReleaseInfo",
    "ReleaseView",
    "RequestChallengeInfo",
    "SealedEpochStore",
    "Signer",
    "TaskRequest",
    "TaskResult",
    "VerifiedTask",
    "address_of",
    "canonical_digest",
    "chain_head",
    "commitment",
    "decode_batch",
    "decode_revert",
    "deploy_contract",
    "encode_batch",
    "find_anvil",
    "find_receipt",
    "leaf_hash",
    "load_artifact",
    "new_salt",
    "open_ledger",
    "open_output",
    "payload_digest",
    "proposal_id",
    "recover_signer",
    "refusal_digest",
    "run_anvil",
    "sign_digest",
    "sign_entry",
    "task_id_for",
    "verify_proof",
]
