// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {BatchCalldata} from "./BatchCalldata.sol";
import {BatchChecker} from "./BatchChecker.sol";
import {BatchMerkle} from "./BatchMerkle.sol";
import {DisputeChecker} from "./DisputeChecker.sol";
import {Governance} from "./Governance.sol";

/// @title SecureCILedger
/// @notice Shared ledger of secure-ci: a registry of parties, devices, edges (enclave keys)
/// and models; per-edge hash-chained batches of task records (Merkle root on chain, records
/// in calldata); forced inclusion (challenges) and disputes that open output commitments.
/// @dev Records are EIP-712 typed data (domain "secure-ci", version "1"). A Merkle leaf is
/// keccak256(bytes.concat(keccak256(abi.encode(uint64 seq, bytes32 recordHash)))) where
/// recordHash is the EIP-712 digest of the TaskResult; trees and proofs are positional (see
/// BatchMerkle: index = seq - firstSeq, depth from the count). Each batch commits to its
/// published records (recordsHash = keccak256(records), also in the head chain); anchorBatch
/// does not parse them, anyone can prove on chain that they do not rebuild the root.
contract SecureCILedger is EIP712, Governance {
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

    struct TaskRequest {
        bytes32 taskId;
        address device;
        uint64 deviceSeq;
        bytes32 modelId;
        uint16 cut;
        bytes32 inputCommitment;
        address edge;
        uint64 deadline;
        bytes32 prevRequest; // struct hash of the device's previous request on the session
    }

    struct Edge {
        uint64 partyId;
        bool registered;
        bool active;
        uint64 nextBatchId;
        uint64 nextSeq;
        uint64 omissions;
        bytes32 head;
        bytes32 measurement;
        bytes32 quoteId;
        string endpoint;
    }

    struct Batch {
        bytes32 root;
        uint64 firstSeq;
        uint32 count;
        uint64 blockNumber;
        bytes32 measurement; // the edge's (allowed) measurement when the batch was anchored
        bytes32 recordsHash; // keccak256 of the records (calldata) published with the batch
    }

    struct Challenge {
        address device;
        uint64 seq;
        uint8 state;
        address edge;
        uint64 deadline;
        bytes32 recordHash;
    }

    /// @dev A challenge from a device's own signed request (it got no result): the edge
    /// answers with the anchored result of that request, or an enclave-signed refusal.
    struct RequestChallenge {
        address device;
        uint64 deadline;
        uint8 state;
        uint8 refusal;
        address edge;
        bytes32 requestHash; // EIP-712 struct hash of the TaskRequest (a result's requestHash)
    }

    struct Dispute {
        bytes32 taskId;
        bytes32 inputKey; // keccak256(abi.encode(device, inputCommitment))
        bytes32 majority; // the strict majority's canonical digest, zero without one
        address reporter;
        uint8 edges; // results compared
        uint8 dissenters; // edges whose canonical digest is not the majority's
    }

    /// @dev Opens a TaskResult's outputCommitment = keccak256(salt || canonical || payload).
    struct Opening {
        bytes32 salt;
        bytes32 canonical;
        bytes32 payload;
    }

    bytes32 public constant TASK_REQUEST_TYPEHASH = keccak256(
        "TaskRequest(bytes32 taskId,address device,uint64 deviceSeq,bytes32 modelId,uint16 cut,"
        "bytes32 inputCommitment,address edge,uint64 deadline,bytes32 prevRequest)"
    );
    bytes32 public constant TASK_RESULT_TYPEHASH = keccak256(
        "TaskResult(bytes32 taskId,bytes32 requestHash,bytes32 outputCommitment,bytes32 measurement,"
        "bytes32 quoteId,uint8 status,uint32 latencyMs,uint64 edgeSeq)"
    );

    /// detail: 0 for a device; keccak256(abi.encode(measurement, quoteId, keccak256(endpoint)))
    /// for an edge, so the enclave key vouches for what it is registered with.
    bytes32 public constant KEY_REGISTRATION_TYPEHASH =
        keccak256("KeyRegistration(uint64 partyId,address key,bytes32 detail,uint64 nonce)");

    uint8 public constant CHALLENGE_OPEN = 1;
    uint8 public constant CHALLENGE_RESOLVED = 2;
    uint8 public constant CHALLENGE_OMITTED = 3;
    uint8 public constant CHALLENGE_REFUSED = 4;

    /// @notice Records per batch: a fraud proof decodes every record (about 3,500 gas each),
    /// so any batch that can be anchored can be proven under a 12 M+ gas transaction limit.
    uint32 public constant MAX_BATCH_RECORDS = 2048;

    /// @notice What an enclave signs to refuse a request it was challenged with (reason 1:
    /// never received; other codes are the edge's refusal codes).
    bytes32 public constant TASK_REFUSAL_TYPEHASH = keccak256("TaskRefusal(bytes32 requestHash,uint8 reason)");

    /// @notice Seconds an edge has to answer a challenge with an inclusion proof.
    uint64 public immutable challengeWindow;
    /// @notice The fraud-proof decoder (see BatchChecker), created with the ledger.
    BatchChecker public immutable batchChecker;
    /// @notice The dispute checker (see DisputeChecker), created with the ledger.
    DisputeChecker public immutable disputeChecker;

    uint256 public challengeCount;
    uint256 public disputeCount;

    /// @notice Registrations each key has made: a proof of possession signs the next one.
    mapping(address key => uint64 nonce) public registrationNonce;
    mapping(address device => uint64 partyId) public deviceParty;
    mapping(address device => bool active) public isRegisteredDevice;
    mapping(address edge => Edge) private _edges;
    mapping(address edge => mapping(uint64 batchId => Batch)) private _batches;
    mapping(uint256 challengeId => Challenge) private _challenges;
    mapping(bytes32 recordHash => uint256 challengeId) public challengeOf;
    mapping(uint256 challengeId => RequestChallenge) private _requestChallenges;
    mapping(bytes32 requestHash => uint256 challengeId) public requestChallengeOf;
    mapping(uint256 disputeId => Dispute) private _disputes;
    mapping(bytes32 key => uint256 disputeId) public disputeOf;
    /// @notice Tasks on which a dispute found the edge outside a strict majority.
    mapping(address edge => uint64 count) public dissents;
    mapping(bytes32 taskEdge => bool) private _dissented;
    address[] public edgeKeys;
    /// @notice Fraud proofs against each edge; an edge with one is faulty for good: it cannot
    /// anchor, cannot answer challenges, and its open challenges can be finalized at once.
    mapping(address edge => uint64 frauds) public fraudCount;
    /// @notice The fault (BatchCalldata code, nonzero) a fraud proof established for a batch.
    mapping(address edge => mapping(uint64 batchId => uint8 fault)) public batchFault;

    event DeviceRegistered(uint64 indexed partyId, address indexed device);
    event DeviceRevoked(uint64 indexed partyId, address indexed device);
    event EdgeRegistered(
        uint64 indexed partyId, address indexed edge, bytes32 measurement, bytes32 quoteId, string endpoint
    );
    event EdgeRevoked(uint64 indexed partyId, address indexed edge);
    event BatchAnchored(
        address indexed edge, uint64 indexed batchId, bytes32 root, uint64 firstSeq, uint32 count, bytes32 newHead
    );
    event ChallengeOpened(
        uint256 indexed challengeId,
        address indexed edge,
        address indexed device,
        bytes32 taskId,
        bytes32 recordHash,
        uint64 seq,
        uint64 deadline
    );
    event ChallengeResolved(uint256 indexed challengeId, address indexed edge, uint64 batchId);
    event RequestChallengeOpened(
        uint256 indexed challengeId,
        address indexed edge,
        address indexed device,
        bytes32 taskId,
        bytes32 requestHash,
        uint64 deadline
    );
    event RequestAnswered(uint256 indexed challengeId, address indexed edge, uint64 batchId, uint64 seq);
    event RequestRefused(uint256 indexed challengeId, address indexed edge, uint8 reason);
    event OmissionRecorded(uint256 indexed challengeId, address indexed edge, bytes32 recordHash, uint64 seq);
    event FraudProven(address indexed edge, uint64 indexed batchId, uint8 fault, address prover);
    event DisputeRecorded(
        uint256 indexed disputeId, bytes32 indexed taskId, bytes32 inputKey, bytes32 majority, uint8 edges
    );
    event DissentRecorded(uint256 indexed disputeId, address indexed edge);

    error DeviceTaken(address device, uint64 partyId);
    error EdgeTaken(address edge, uint64 partyId);
    error UnknownDevice(address device);
    error UnknownEdge(address edge);
    error MeasurementNotAllowed(bytes32 measurement);
    error NoKeyPossession(address key);
    error NotTaskDevice(address caller);
    error EmptyBatch();
    error BatchTooLarge(uint32 count, uint32 max);
    error BatchGap(uint64 expected, uint64 got);
    error BatchReplay(uint64 expected, uint64 got);
    error FirstSeqMismatch(uint64 expected, uint64 got);
    error PrevHeadMismatch(bytes32 expected, bytes32 got);
    error UnknownBatch(address edge, uint64 batchId);
    error SeqNotInBatch(uint64 seq);
    error InvalidProof();
    error NotRegisteredDevice(address caller);
    error InvalidEdgeSignature();
    error ChallengeExists(uint256 challengeId);
    error UnknownChallenge(uint256 challengeId);
    error ChallengeNotOpen(uint256 challengeId);
    error ChallengeWindowClosed(uint256 challengeId);
    error ChallengeWindowOpen(uint256 challengeId);
    // raised by DisputeChecker, passed through by dispute
    error DisputeSize(uint256 results);
    error DisputeTaskMismatch();
    error BadOpening(uint256 index);
    error SameOutput();
    error SameEdge();
    error DisputeExists(uint256 disputeId);
    error RecordsMismatch(bytes32 expected, bytes32 got);
    error NoFraud(address edge, uint64 batchId);
    error FraudAlreadyProven(address edge, uint64 batchId);
    error EdgeFaulty(address edge);
    error InvalidDeviceSignature();
    error RequestMismatch();
    error InvalidRefusalReason(uint8 reason);

    /// @param founders admins of parties 2, 3, ... (the deployer's key administers party 1)
    /// @param threshold_ approvals a governance proposal needs (1..number of parties)
    /// @param noticePeriod_ seconds from approving a new release to its becoming valid
    constructor(uint64 challengeWindow_, address[] memory founders, uint32 threshold_, uint64 noticePeriod_)
        EIP712("secure-ci", "1")
        Governance(founders, threshold_, noticePeriod_)
    {
        challengeWindow = challengeWindow_;
        batchChecker = new BatchChecker();
        disputeChecker = new DisputeChecker();
    }

    modifier onlyPartyAdmin(uint64 partyId) {
        if (partyAdmin[partyId] == address(0)) revert UnknownParty(partyId);
        if (partyAdmin[partyId] != msg.sender) revert NotPartyAdmin(partyId, msg.sender);
        _;
    }

    // ---------------------------------------------------------------- registry

    // Parties, measurements and models are added by k-of-n proposals: see Governance.

    /// @notice Register (or re-activate) a device key for a party.
    /// @notice Register `device` for the party; `proof` is the device key's EIP-712 signature
    /// of KeyRegistration(partyId, device, 0), so no admin can claim another party's key.
    function registerDevice(uint64 partyId, address device, bytes calldata proof)
        external
        onlyPartyAdmin(partyId)
    {
        if (device == address(0)) revert ZeroAddress();
        _checkPossession(partyId, device, bytes32(0), proof);
        uint64 owner_ = deviceParty[device];
        if (owner_ != 0 && owner_ != partyId) revert DeviceTaken(device, owner_);
        deviceParty[device] = partyId;
        isRegisteredDevice[device] = true;
        emit DeviceRegistered(partyId, device);
    }

    function revokeDevice(address device) external {
        uint64 partyId = deviceParty[device];
        if (partyId == 0) revert UnknownDevice(device);
        if (partyAdmin[partyId] != msg.sender) revert NotPartyAdmin(partyId, msg.sender);
        isRegisteredDevice[device] = false;
        emit DeviceRevoked(partyId, device);
    }

    /// @notice Register an edge's enclave key, or update its attestation (the batch chain stays).
    /// Its measurement must be a release valid now.
    function registerEdge(
        uint64 partyId,
        address edgeKey,
        bytes32 measurement,
        bytes32 quoteId,
        string calldata endpoint,
        bytes calldata proof
    ) external onlyPartyAdmin(partyId) {
        if (edgeKey == address(0)) revert ZeroAddress();
        bytes32 detail = keccak256(abi.encode(measurement, quoteId, keccak256(bytes(endpoint))));
        _checkPossession(partyId, edgeKey, detail, proof);
        Edge storage e = _edges[edgeKey];
        if (e.registered && e.partyId != partyId) revert EdgeTaken(edgeKey, e.partyId);
        _requireValidMeasurement(measurement);
        if (!e.registered) {
            e.registered = true;
            e.partyId = partyId;
            edgeKeys.push(edgeKey);
        }
        e.active = true;
        e.measurement = measurement;
        e.quoteId = quoteId;
        e.endpoint = endpoint;
        emit EdgeRegistered(partyId, edgeKey, measurement, quoteId, endpoint);
    }

    function revokeEdge(address edgeKey) external {
        Edge storage e = _edges[edgeKey];
        if (!e.registered) revert UnknownEdge(edgeKey);
        if (partyAdmin[e.partyId] != msg.sender) revert NotPartyAdmin(e.partyId, msg.sender);
        e.active = false;
        emit EdgeRevoked(e.partyId, edgeKey);
    }

    // ---------------------------------------------------------------- batches

    /// @notice Anchor the next batch of the sender's (an active edge key's) batch chain.
    /// @dev `records` is only hashed (recordsHash, stored and chained into the head):
    /// anyone can later prove with proveFraud that they do not rebuild `root`.
    function anchorBatch(
        uint64 batchId,
        bytes32 root,
        uint64 firstSeq,
        uint32 count,
        bytes32 prevHead,
        bytes calldata records
    ) external {
        Edge storage e = _edges[msg.sender];
        if (!e.active) revert UnknownEdge(msg.sender);
        if (fraudCount[msg.sender] != 0) revert EdgeFaulty(msg.sender);
        if (!allowedMeasurement[e.measurement]) revert MeasurementNotAllowed(e.measurement);
        if (count == 0) revert EmptyBatch();
        if (count > MAX_BATCH_RECORDS) revert BatchTooLarge(count, MAX_BATCH_RECORDS);
        uint64 expected = e.nextBatchId;
        if (batchId > expected) revert BatchGap(expected, batchId);
        if (batchId < expected) revert BatchReplay(expected, batchId);
        if (firstSeq != e.nextSeq) revert FirstSeqMismatch(e.nextSeq, firstSeq);
        if (prevHead != e.head) revert PrevHeadMismatch(e.head, prevHead);
        bytes32 recordsHash = keccak256(records);
        bytes32 newHead = keccak256(abi.encode(prevHead, root, recordsHash, firstSeq, count));
        _batches[msg.sender][batchId] =
            Batch(root, firstSeq, count, uint64(block.number), e.measurement, recordsHash);
        e.nextBatchId = expected + 1;
        e.nextSeq = firstSeq + count;
        e.head = newHead;
        emit BatchAnchored(msg.sender, batchId, root, firstSeq, count, newHead);
    }

    /// @notice Prove that a batch's published records are fraudulent: `records` (the batch's
    /// calldata, checked against its recordsHash) break a rule of the encoding or do not
    /// rebuild its root (see BatchCalldata). Anyone may call; the fault is recorded against
    /// the edge, which is faulty from then on. Reverts NoFraud for an honest batch.
    function proveFraud(address edge, uint64 batchId, bytes calldata records) external returns (uint8 fault) {
        if (batchId >= _edges[edge].nextBatchId) revert UnknownBatch(edge, batchId);
        if (batchFault[edge][batchId] != 0) revert FraudAlreadyProven(edge, batchId);
        Batch storage b = _batches[edge][batchId];
        bytes32 got = keccak256(records);
        if (got != b.recordsHash) revert RecordsMismatch(b.recordsHash, got);
        fault = batchChecker.check(records, edge, b.firstSeq, b.count, b.root, _domainSeparatorV4());
        if (fault == BatchCalldata.OK) revert NoFraud(edge, batchId);
        batchFault[edge][batchId] = fault;
        fraudCount[edge] += 1;
        emit FraudProven(edge, batchId, fault, msg.sender);
    }

    /// @notice True when `recordHash` at `seq` is provably in the edge's anchored batch.
    function verifyTask(
        address edge,
        uint64 batchId,
        uint64 seq,
        bytes32 recordHash,
        bytes32[] calldata proof
    ) public view returns (bool) {
        if (batchId >= _edges[edge].nextBatchId) return false;
        if (batchFault[edge][batchId] != 0) return false; // proven fraudulent: proves nothing
        Batch storage b = _batches[edge][batchId];
        if (seq < b.firstSeq || seq - b.firstSeq >= b.count) return false;
        if (proof.length > 64) return false;
        return _provesLeaf(b, seq, recordHash, proof);
    }

    // ---------------------------------------------------------------- challenges

    /// @notice A registered device forces an edge-signed result onto the chain; the edge
    /// must prove its inclusion within `challengeWindow` or the omission is recorded.
    function challenge(TaskResult calldata res, bytes calldata edgeSig) external returns (uint256 challengeId) {
        if (!isRegisteredDevice[msg.sender]) revert NotRegisteredDevice(msg.sender);
        bytes32 recordHash = hashTaskResult(res);
        address edge = _recoverEdge(recordHash, edgeSig);
        uint256 existing = challengeOf[recordHash];
        if (existing != 0) revert ChallengeExists(existing);
        challengeId = ++challengeCount;
        uint64 deadline = uint64(block.timestamp) + challengeWindow;
        _challenges[challengeId] = Challenge(msg.sender, res.edgeSeq, CHALLENGE_OPEN, edge, deadline, recordHash);
        challengeOf[recordHash] = challengeId;
        emit ChallengeOpened(challengeId, edge, msg.sender, res.taskId, recordHash, res.edgeSeq, deadline);
    }

    /// @notice Anyone may answer a challenge with the record's inclusion proof.
    function respondChallenge(uint256 challengeId, uint64 batchId, bytes32[] calldata proof) external {
        Challenge storage c = _openChallenge(challengeId);
        if (block.timestamp > c.deadline) revert ChallengeWindowClosed(challengeId);
        if (fraudCount[c.edge] != 0) revert EdgeFaulty(c.edge);
        if (batchId >= _edges[c.edge].nextBatchId) revert UnknownBatch(c.edge, batchId);
        Batch storage b = _batches[c.edge][batchId];
        if (c.seq < b.firstSeq || c.seq - b.firstSeq >= b.count) revert SeqNotInBatch(c.seq);
        if (!_provesLeaf(b, c.seq, c.recordHash, proof)) revert InvalidProof();
        c.state = CHALLENGE_RESOLVED;
        emit ChallengeResolved(challengeId, c.edge, batchId);
    }

    /// @notice After the window (at once against a faulty edge), an unanswered challenge
    /// becomes a recorded omission.
    function finalizeChallenge(uint256 challengeId) external {
        Challenge storage c = _openChallenge(challengeId);
        if (block.timestamp <= c.deadline && fraudCount[c.edge] == 0) revert ChallengeWindowOpen(challengeId);
        c.state = CHALLENGE_OMITTED;
        _edges[c.edge].omissions += 1;
        emit OmissionRecorded(challengeId, c.edge, c.recordHash, c.seq);
    }

    // ---------------------------------------------------------------- request-only challenges

    /// @notice A registered device that got no result challenges the edge its signed request
    /// names; the edge must answer (answerRequest) or refuse (refuseRequest) within
    /// `challengeWindow`, else finalizeRequestChallenge records the omission.
    function challengeRequest(TaskRequest calldata req, bytes calldata deviceSig)
        external
        returns (uint256 challengeId)
    {
        if (!isRegisteredDevice[msg.sender]) revert NotRegisteredDevice(msg.sender);
        if (msg.sender != req.device) revert NotTaskDevice(msg.sender);
        bytes32 requestHash = hashTaskRequest(req);
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(_hashTypedDataV4(requestHash), deviceSig);
        if (err != ECDSA.RecoverError.NoError || signer != req.device) revert InvalidDeviceSignature();
        if (!_edges[req.edge].registered) revert UnknownEdge(req.edge);
        uint256 existing = requestChallengeOf[requestHash];
        if (existing != 0) revert ChallengeExists(existing);
        challengeId = ++challengeCount;
        uint64 deadline = uint64(block.timestamp) + challengeWindow;
        _requestChallenges[challengeId] =
            RequestChallenge(msg.sender, deadline, CHALLENGE_OPEN, 0, req.edge, requestHash);
        requestChallengeOf[requestHash] = challengeId;
        emit RequestChallengeOpened(challengeId, req.edge, msg.sender, req.taskId, requestHash, deadline);
    }

    /// @notice Anyone may answer with the anchored result of the request: the record and its
    /// positional proof in one of the edge's batches.
    function answerRequest(uint256 challengeId, TaskResult calldata res, uint64 batchId, bytes32[] calldata proof)
        external
    {
        RequestChallenge storage c = _openRequestChallenge(challengeId);
        if (res.requestHash != c.requestHash) revert RequestMismatch();
        if (batchId >= _edges[c.edge].nextBatchId) revert UnknownBatch(c.edge, batchId);
        Batch storage b = _batches[c.edge][batchId];
        if (res.edgeSeq < b.firstSeq || res.edgeSeq - b.firstSeq >= b.count) revert SeqNotInBatch(res.edgeSeq);
        if (!_provesLeaf(b, res.edgeSeq, hashTaskResult(res), proof)) revert InvalidProof();
        c.state = CHALLENGE_RESOLVED;
        emit RequestAnswered(challengeId, c.edge, batchId, res.edgeSeq);
    }

    /// @notice The edge's enclave refuses the request (signed TaskRefusal); recorded as such.
    function refuseRequest(uint256 challengeId, uint8 reason, bytes calldata edgeSig) external {
        if (reason == 0) revert InvalidRefusalReason(reason);
        RequestChallenge storage c = _openRequestChallenge(challengeId);
        bytes32 digest = _hashTypedDataV4(keccak256(abi.encode(TASK_REFUSAL_TYPEHASH, c.requestHash, reason)));
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, edgeSig);
        if (err != ECDSA.RecoverError.NoError || signer != c.edge) revert InvalidEdgeSignature();
        c.state = CHALLENGE_REFUSED;
        c.refusal = reason;
        emit RequestRefused(challengeId, c.edge, reason);
    }

    /// @notice After the window (at once against a faulty edge), an unanswered request
    /// challenge becomes a recorded omission.
    function finalizeRequestChallenge(uint256 challengeId) external {
        RequestChallenge storage c = _requestChallenges[challengeId];
        if (c.state == 0) revert UnknownChallenge(challengeId);
        if (c.state != CHALLENGE_OPEN) revert ChallengeNotOpen(challengeId);
        if (block.timestamp <= c.deadline && fraudCount[c.edge] == 0) revert ChallengeWindowOpen(challengeId);
        c.state = CHALLENGE_OMITTED;
        _edges[c.edge].omissions += 1;
        emit OmissionRecorded(challengeId, c.edge, c.requestHash, 0);
    }

    function getRequestChallenge(uint256 challengeId) external view returns (RequestChallenge memory) {
        RequestChallenge memory c = _requestChallenges[challengeId];
        if (c.state == 0) revert UnknownChallenge(challengeId);
        return c;
    }

    /// @dev An open request challenge the edge can still answer (window open, edge not faulty).
    function _openRequestChallenge(uint256 challengeId) private view returns (RequestChallenge storage c) {
        c = _requestChallenges[challengeId];
        if (c.state == 0) revert UnknownChallenge(challengeId);
        if (c.state != CHALLENGE_OPEN) revert ChallengeNotOpen(challengeId);
        if (block.timestamp > c.deadline) revert ChallengeWindowClosed(challengeId);
        if (fraudCount[c.edge] != 0) revert EdgeFaulty(c.edge);
    }

    // ---------------------------------------------------------------- disputes

    /// @notice Record k (2..8) results of one task a device sent to k edges, with the
    /// openings of their output commitments, and the dissenters among them.
    /// @dev DisputeChecker checks the evidence (same task, device, model, cut and input;
    /// each result signed by the edge its request names; distinct edges; each opening opens
    /// its commitment; not all canonical digests equal, else SameOutput). A strict majority
    /// makes every edge with another canonical digest a dissenter (counted once per task
    /// and edge); without one the dispute is recorded with no dissenter. The openings make it
    /// objective, so anyone holding them may file; a set of edges is disputed once per task.
    function dispute(
        TaskRequest[] calldata requests,
        TaskResult[] calldata results,
        bytes[] calldata signatures,
        Opening[] calldata openings
    ) external returns (uint256 disputeId) {
        (requests, results, signatures, openings); // checked by DisputeChecker
        DisputeChecker.Verdict memory v;
        address checker = address(disputeChecker);
        bytes32 separator = _domainSeparatorV4();
        assembly ("memory-safe") {
            // calldata || separator to the checker; its revert data passes through as is
            let data := mload(0x40)
            calldatacopy(data, 0, calldatasize())
            mstore(add(data, calldatasize()), separator)
            if iszero(staticcall(gas(), checker, data, add(calldatasize(), 32), 0, 0)) {
                returndatacopy(data, 0, returndatasize())
                revert(data, returndatasize())
            }
            returndatacopy(v, 0, 0xc0) // the Verdict's six words, then its edges
            returndatacopy(mload(add(v, 0xc0)), 0xc0, 0x100)
        }
        if (disputeOf[v.key] != 0) revert DisputeExists(disputeOf[v.key]);
        disputeId = ++disputeCount;
        disputeOf[v.key] = disputeId;
        uint8 dissenters;
        for (uint256 i = 0; i < v.count; ++i) {
            address edge = v.edges[i];
            if (!_edges[edge].registered) revert UnknownEdge(edge);
            if (v.dissent & (1 << i) == 0) continue;
            ++dissenters;
            bytes32 once = keccak256(abi.encode(v.inputKey, edge));
            if (_dissented[once]) continue; // already counted for this task
            _dissented[once] = true;
            dissents[edge] += 1;
            emit DissentRecorded(disputeId, edge);
        }
        _disputes[disputeId] =
            Dispute(v.taskId, v.inputKey, v.majority, msg.sender, uint8(v.count), dissenters);
        emit DisputeRecorded(disputeId, v.taskId, v.inputKey, v.majority, uint8(v.count));
    }

    // ---------------------------------------------------------------- views

    function edgeState(address edge)
        external
        view
        returns (
            uint64 nextBatchId,
            uint64 nextSeq,
            bytes32 head,
            uint64 omissions,
            bool registered,
            bool active,
            bytes32 measurement
        )
    {
        Edge storage e = _edges[edge];
        return (e.nextBatchId, e.nextSeq, e.head, e.omissions, e.registered, e.active, e.measurement);
    }

    function edgeInfo(address edge)
        external
        view
        returns (uint64 partyId, bytes32 quoteId, string memory endpoint)
    {
        Edge storage e = _edges[edge];
        return (e.partyId, e.quoteId, e.endpoint);
    }

    function edgeCount() external view returns (uint256) {
        return edgeKeys.length;
    }

    function batchInfo(address edge, uint64 batchId)
        external
        view
        returns (bytes32 root, uint64 firstSeq, uint32 count, uint64 blockNumber, bytes32 measurement)
    {
        if (batchId >= _edges[edge].nextBatchId) revert UnknownBatch(edge, batchId);
        Batch storage b = _batches[edge][batchId];
        return (b.root, b.firstSeq, b.count, b.blockNumber, b.measurement);
    }

    /// @notice keccak256 of the records the batch published (its calldata `records`).
    function batchRecordsHash(address edge, uint64 batchId) external view returns (bytes32) {
        if (batchId >= _edges[edge].nextBatchId) revert UnknownBatch(edge, batchId);
        return _batches[edge][batchId].recordsHash;
    }

    function getChallenge(uint256 challengeId) external view returns (Challenge memory) {
        // request challenges share the id counter: an id that is one of theirs is unknown here
        if (_challenges[challengeId].device == address(0)) revert UnknownChallenge(challengeId);
        return _challenges[challengeId];
    }

    function getDispute(uint256 disputeId) external view returns (Dispute memory) {
        return _disputes[disputeId];
    }

    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /// @notice The record hash: EIP-712 digest of a TaskResult under this contract's domain.
    function hashTaskResult(TaskResult calldata r) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(
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
            )
        );
    }

    /// @notice EIP-712 struct hash of a TaskRequest (what a TaskResult's requestHash holds).
    function hashTaskRequest(TaskRequest calldata q) public pure returns (bytes32) {
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

    /// @notice The Merkle leaf of a record: double-hashed, carrying its sequence number.
    function leaf(uint64 seq, bytes32 recordHash) public pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(seq, recordHash))));
    }

    // ---------------------------------------------------------------- internals

    /// @dev The key itself signed KeyRegistration(partyId, key, detail) under this domain.
    /// Each proof is good once: the key's registration nonce is part of it and moves on.
    function _checkPossession(uint64 partyId, address key, bytes32 detail, bytes calldata proof)
        private
    {
        uint64 nonce = registrationNonce[key]++;
        bytes32 digest = _hashTypedDataV4(
            keccak256(abi.encode(KEY_REGISTRATION_TYPEHASH, partyId, key, detail, nonce))
        );
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, proof);
        if (err != ECDSA.RecoverError.NoError || signer != key) revert NoKeyPossession(key);
    }

    function _recoverEdge(bytes32 digest, bytes calldata sig) private view returns (address edge) {
        (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecover(digest, sig);
        if (err != ECDSA.RecoverError.NoError) revert InvalidEdgeSignature();
        if (!_edges[signer].registered) revert UnknownEdge(signer);
        return signer;
    }

    /// @dev True when `proof` is the positional proof of leaf(seq, recordHash) in `b`.
    function _provesLeaf(Batch storage b, uint64 seq, bytes32 recordHash, bytes32[] calldata proof)
        private
        view
        returns (bool)
    {
        uint256 index = seq - b.firstSeq;
        uint256 count = b.count;
        // the proof's length is a function of (index, count): check it before hashing
        uint256 expected;
        uint256 i = index;
        for (uint256 size = count; size > 1; size = (size + 1) >> 1) {
            if (i ^ 1 < size) ++expected;
            i >>= 1;
        }
        if (proof.length != expected) return false;
        return BatchMerkle.rootFromProof(leaf(seq, recordHash), index, count, proof) == b.root;
    }

    function _openChallenge(uint256 challengeId) private view returns (Challenge storage c) {
        c = _challenges[challengeId];
        if (c.state == 0) revert UnknownChallenge(challengeId);
        if (c.state != CHALLENGE_OPEN) revert ChallengeNotOpen(challengeId);
    }
}
