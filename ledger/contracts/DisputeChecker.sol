// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.30;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";

/// @title The checks of a k-way dispute, as a contract of its own
/// @notice SecureCILedger creates one in its constructor and forwards `dispute` calldata to it
/// (with the ledger's EIP-712 domain separator appended as one more word), so the checking
/// code counts against this contract's size, not the ledger's (EIP-170). Pure: it holds
/// nothing; the ledger records what it returns.
/// @dev An output commitment opens to (salt, canonical, payload):
/// outputCommitment = keccak256(salt || canonical || payload), where canonical is the digest
/// of the output's canonical bytes under the model's rule, bound to the request's salt
/// (docs/ledger-format.md, "Output commitments and disputes").
contract DisputeChecker {
    // Field for field the ledger's TaskRequest / TaskResult (same ABI, same selector).
    struct TaskRequest {
        bytes32 taskId;
        address device;
        uint64 deviceSeq;
        bytes32 modelId;
        uint16 cut;
        bytes32 inputCommitment;
        address edge;
        uint64 deadline;
        bytes32 prevRequest;
    }

    struct TaskResult {
        bytes32 taskId;
        bytes32 requestHash;
        bytes32 outputCommitment;
        bytes32 measurement;
        bytes32 quoteId;
        uint8 status;
        uint32 latencyMs;
        uint64 edgeSeq;
    }

    struct Opening {
        bytes32 salt;
        bytes32 canonical;
        bytes32 payload;
    }

    bytes32 private constant TASK_REQUEST_TYPEHASH = keccak256(
        "TaskRequest(bytes32 taskId,address device,uint64 deviceSeq,bytes32 modelId,uint16 cut,"
        "bytes32 inputCommitment,address edge,uint64 deadline,bytes32 prevRequest)"
    );
    bytes32 private constant TASK_RESULT_TYPEHASH = keccak256(
        "TaskResult(bytes32 taskId,bytes32 requestHash,bytes32 outputCommitment,bytes32 measurement,"
        "bytes32 quoteId,uint8 status,uint32 latencyMs,uint64 edgeSeq)"
    );
    /// @notice What the ledger records: the task, its input key (keccak256(abi.encode(device,
    /// inputCommitment))), the dispute key (keccak256(abi.encode(taskId, inputKey, the edges
    /// in ascending order))), the strict majority's canonical digest (zero without one), and
    /// the `count` edges in ascending order with a bit per dissenter (bit i: edges[i]).
    struct Verdict {
        bytes32 taskId;
        bytes32 inputKey;
        bytes32 key;
        bytes32 majority;
        uint256 count;
        uint256 dissent;
        address[8] edges;
    }

    uint256 public constant MIN_RESULTS = 2;
    uint256 public constant MAX_RESULTS = 8;

    error DisputeSize(uint256 results);
    error DisputeTaskMismatch();
    error InvalidEdgeSignature();
    error SameEdge();
    error BadOpening(uint256 index);
    error SameOutput();

    /// @notice Check k results (2..8) of one task and compare their opened canonical outputs.
    /// @dev Called by the ledger with its domain separator appended to this calldata. Each
    /// result answers its request (requestHash), every request is the same task of the same
    /// device on the same model, cut and input, each result is signed by the edge its request
    /// names, edges are distinct, each opening opens its result's commitment, and not all
    /// canonical digests are equal.
    function dispute(
        TaskRequest[] calldata requests,
        TaskResult[] calldata results,
        bytes[] calldata signatures,
        Opening[] calldata openings
    ) external pure returns (Verdict memory v) {
        uint256 k = requests.length;
        if (k < MIN_RESULTS || k > MAX_RESULTS || results.length != k || signatures.length != k
                || openings.length != k) revert DisputeSize(k);
        bytes32 separator;
        assembly {
            separator := calldataload(sub(calldatasize(), 32))
        }
        TaskRequest calldata first = requests[0];
        bytes32 taskId = first.taskId;
        address[] memory edges = new address[](k);
        bytes32[] memory canonical = new bytes32[](k);
        for (uint256 i = 0; i < k; ++i) {
            TaskRequest calldata q = requests[i];
            TaskResult calldata r = results[i];
            if (
                q.taskId != taskId || r.taskId != taskId || q.device != first.device
                    || q.modelId != first.modelId || q.cut != first.cut
                    || q.inputCommitment != first.inputCommitment || _hashRequest(q) != r.requestHash
            ) revert DisputeTaskMismatch();
            (address signer, ECDSA.RecoverError err,) =
                ECDSA.tryRecover(_hashResult(r, separator), signatures[i]);
            if (err != ECDSA.RecoverError.NoError) revert InvalidEdgeSignature();
            if (signer != q.edge) revert DisputeTaskMismatch();
            Opening calldata o = openings[i];
            if (keccak256(abi.encodePacked(o.salt, o.canonical, o.payload)) != r.outputCommitment) {
                revert BadOpening(i);
            }
            // insertion into ascending order; an equal address is the same edge twice
            uint256 j = i;
            while (j > 0 && edges[j - 1] >= signer) {
                if (edges[j - 1] == signer) revert SameEdge();
                edges[j] = edges[j - 1];
                canonical[j] = canonical[j - 1];
                --j;
            }
            edges[j] = signer;
            canonical[j] = o.canonical;
        }
        v.taskId = taskId;
        v.inputKey = keccak256(abi.encode(first.device, first.inputCommitment));
        v.key = keccak256(abi.encode(taskId, v.inputKey, edges));
        v.count = k;
        for (uint256 i = 0; i < k; ++i) {
            v.edges[i] = edges[i];
        }
        (v.majority, v.dissent) = _compare(canonical);
    }

    /// @dev The strict majority's canonical digest and a bit per index that differs from it;
    /// none and no dissenter without a strict majority; SameOutput when all agree.
    function _compare(bytes32[] memory canonical) private pure returns (bytes32 majority, uint256 dissent) {
        uint256 k = canonical.length;
        uint256 best;
        uint256 bestCount;
        for (uint256 i = 0; i < k; ++i) {
            uint256 count;
            for (uint256 j = 0; j < k; ++j) {
                if (canonical[j] == canonical[i]) ++count;
            }
            if (count > bestCount) (best, bestCount) = (i, count);
        }
        if (bestCount == k) revert SameOutput();
        if (2 * bestCount <= k) return (bytes32(0), 0);
        majority = canonical[best];
        for (uint256 i = 0; i < k; ++i) {
            if (canonical[i] != majority) dissent |= 1 << i;
        }
    }

    function _hashRequest(TaskRequest calldata q) private pure returns (bytes32) {
        return keccak256(
            abi.encode(
                TASK_REQUEST_TYPEHASH,
                q.taskId,
                q.device,
                q.deviceSeq,
                q.modelId,
                q.cut,
                q.inputCommitment,
                q.edge,
                q.deadline,
                q.prevRequest
            )
        );
    }

    function _hashResult(TaskResult calldata r, bytes32 separator) private pure returns (bytes32) {
        bytes32 structHash = keccak256(
            abi.encode(
                TASK_RESULT_TYPEHASH,
                r.taskId,
                r.requestHash,
                r.outputCommitment,
                r.measurement,
                r.quoteId,
                r.status,
                r.latencyMs,
                r.edgeSeq
            )
        );
        return keccak256(abi.encodePacked(hex"1901", separator, structHash));
    }
}
