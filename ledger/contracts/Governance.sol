// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @title Governance
/// @notice k-of-n governance of secure-ci's parties and its release registry (enclave
/// measurements and models). Adding a party, a release (or renewing its validity window) and
/// lifting a suspension are proposals that need `threshold` parties' approvals; any single
/// party suspends a release at once (fail safe). A new release becomes valid no earlier than
/// `noticePeriod` seconds after the proposal is executed, so every party sees it coming.
/// @dev Parties are numbered 1..partyCount; the deployer administers party 1 and founding
/// parties follow in the order given. One admin key administers at most one party, so it
/// holds one vote. A proposal's id is the keccak256 of its action:
/// keccak256(abi.encode(op, kind, digest, partyId, admin, notBefore, notAfter,
/// sourcesHash, nonce)) with sourcesHash = keccak256(abi.encodePacked(sources)) and nonce the
/// release's suspension count for a lift (0 otherwise). The same action is one proposal:
/// proposing it again reverts. A release is valid at time t when it exists, is not
/// suspended and notBefore <= t < notAfter. `allowedMeasurement` says "approved and not
/// suspended" (anchoring checks it: an edge may still anchor what it did before its release
/// expired); registering an edge needs its measurement valid now.
abstract contract Governance {
    struct Release {
        uint64 partyId; // the model's owner; 0 for a measurement
        uint64 notBefore; // when it becomes valid (at least the notice period after approval)
        uint64 notAfter; // when it stops being valid
        uint32 suspensions; // times suspended; a lift names the suspension it lifts
        bool suspended;
        bool exists;
        bytes32 sources; // keccak256(abi.encodePacked(digests it was built from))
    }

    struct Proposal {
        uint8 op;
        uint8 kind;
        uint8 state;
        uint32 approvals;
        uint32 nonce;
        uint64 partyId;
        uint64 notBefore;
        uint64 notAfter;
        uint64 proposer;
        address admin;
        bytes32 digest;
        bytes32 sources;
    }

    uint8 public constant RELEASE_MEASUREMENT = 0;
    uint8 public constant RELEASE_MODEL = 1;
    uint8 public constant OP_ADD_PARTY = 1;
    uint8 public constant OP_ADD_RELEASE = 2;
    uint8 public constant OP_LIFT_SUSPENSION = 3;
    uint8 public constant PROPOSAL_PENDING = 1;
    uint8 public constant PROPOSAL_EXECUTED = 2;
    uint256 public constant MAX_SOURCES = 16;

    /// @notice Approvals a proposal needs (k of the n parties), fixed at deployment.
    uint32 public immutable threshold;
    /// @notice Seconds between approving a new release and its becoming valid.
    uint64 public immutable noticePeriod;

    uint64 public partyCount;
    mapping(uint64 partyId => address admin) public partyAdmin;
    mapping(address admin => uint64 partyId) public partyOf;
    /// @notice An approved measurement release that is not suspended (see the contract notes).
    mapping(bytes32 measurement => bool allowed) public allowedMeasurement;
    mapping(bytes32 modelId => uint64 partyId) public modelParty;
    mapping(bytes32 proposalId => mapping(uint64 partyId => bool)) public approvedBy;
    mapping(uint8 kind => mapping(bytes32 digest => Release)) private _releases;
    mapping(bytes32 proposalId => Proposal) private _proposals;

    event PartyRegistered(uint64 indexed partyId, address admin);
    event MeasurementAllowed(bytes32 indexed measurement, bool allowed);
    event ModelRegistered(uint64 indexed partyId, bytes32 indexed modelId);
    event ProposalCreated(
        bytes32 indexed proposalId,
        uint64 indexed proposer,
        uint8 op,
        uint8 kind,
        bytes32 digest,
        uint64 partyId,
        address admin,
        uint64 notBefore,
        uint64 notAfter,
        uint32 nonce,
        bytes32[] sources
    );
    event ProposalApproved(bytes32 indexed proposalId, uint64 indexed partyId, uint32 approvals);
    event ProposalExecuted(bytes32 indexed proposalId, uint8 op);
    event ReleaseAdded(
        uint8 indexed kind, bytes32 indexed digest, uint64 partyId, uint64 notBefore, uint64 notAfter, bytes32 sources
    );
    event ReleaseSuspended(uint8 indexed kind, bytes32 indexed digest, uint64 indexed byParty, uint32 suspension);
    event SuspensionLifted(uint8 indexed kind, bytes32 indexed digest, uint32 suspension);

    error ZeroAddress();
    error UnknownParty(uint64 partyId);
    error NotPartyAdmin(uint64 partyId, address caller);
    error ModelTaken(bytes32 modelId, uint64 partyId);
    error NotParty(address caller);
    error InvalidThreshold(uint32 threshold, uint64 parties);
    error AdminTaken(address admin, uint64 partyId);
    error UnknownReleaseKind(uint8 kind);
    error InvalidWindow(uint64 notBefore, uint64 notAfter);
    error TooManySources(uint256 count);
    error ProposalExists(bytes32 proposalId);
    error UnknownProposal(bytes32 proposalId);
    error ProposalNotPending(bytes32 proposalId);
    error AlreadyApproved(bytes32 proposalId, uint64 partyId);
    error NotEnoughApprovals(bytes32 proposalId, uint32 approvals, uint32 threshold);
    error WindowEnded(bytes32 proposalId, uint64 notAfter, uint64 validFrom);
    error UnknownRelease(uint8 kind, bytes32 digest);
    error AlreadySuspended(uint8 kind, bytes32 digest);
    error NotSuspended(uint8 kind, bytes32 digest);
    error ReleaseNotValid(uint8 kind, bytes32 digest);

    /// @param founders admins of parties 2, 3, ... (the deployer administers party 1)
    constructor(address[] memory founders, uint32 threshold_, uint64 noticePeriod_) {
        _addParty(msg.sender);
        for (uint256 i = 0; i < founders.length; i++) {
            _addParty(founders[i]);
        }
        if (threshold_ == 0 || threshold_ > partyCount) revert InvalidThreshold(threshold_, partyCount);
        threshold = threshold_;
        noticePeriod = noticePeriod_;
    }

    // ---------------------------------------------------------------- proposals

    /// @notice Propose a new party administered by `admin`; the proposer's approval counts.
    function proposeParty(address admin) external returns (bytes32 id) {
        uint64 proposer = _callerParty();
        if (admin == address(0)) revert ZeroAddress();
        if (partyOf[admin] != 0) revert AdminTaken(admin, partyOf[admin]);
        id = _propose(proposer, OP_ADD_PARTY, 0, bytes32(0), 0, admin, 0, 0, 0, new bytes32[](0));
    }

    /// @notice Propose a release (or a new window for an existing one). A model release names
    /// its owning party and is proposed by that party's admin.
    function proposeRelease(
        uint8 kind,
        bytes32 digest,
        uint64 partyId,
        uint64 notBefore,
        uint64 notAfter,
        bytes32[] calldata sources
    ) external returns (bytes32 id) {
        uint64 proposer = _callerParty();
        if (kind == RELEASE_MEASUREMENT) {
            if (partyId != 0) revert UnknownParty(partyId);
        } else if (kind == RELEASE_MODEL) {
            if (partyAdmin[partyId] == address(0)) revert UnknownParty(partyId);
            if (partyAdmin[partyId] != msg.sender) revert NotPartyAdmin(partyId, msg.sender);
            uint64 owner_ = modelParty[digest];
            if (owner_ != 0 && owner_ != partyId) revert ModelTaken(digest, owner_);
        } else {
            revert UnknownReleaseKind(kind);
        }
        if (notAfter <= notBefore) revert InvalidWindow(notBefore, notAfter);
        if (sources.length > MAX_SOURCES) revert TooManySources(sources.length);
        id = _propose(proposer, OP_ADD_RELEASE, kind, digest, partyId, address(0), notBefore, notAfter, 0, sources);
    }

    /// @notice Propose lifting the release's current suspension.
    function proposeLift(uint8 kind, bytes32 digest) external returns (bytes32 id) {
        uint64 proposer = _callerParty();
        Release storage r = _existingRelease(kind, digest);
        if (!r.suspended) revert NotSuspended(kind, digest);
        id = _propose(proposer, OP_LIFT_SUSPENSION, kind, digest, 0, address(0), 0, 0, r.suspensions, new bytes32[](0));
    }

    function approve(bytes32 id) external {
        uint64 party = _callerParty();
        Proposal storage p = _pending(id);
        if (approvedBy[id][party]) revert AlreadyApproved(id, party);
        approvedBy[id][party] = true;
        p.approvals += 1;
        emit ProposalApproved(id, party, p.approvals);
    }

    /// @notice Carry out a proposal with enough approvals (anyone may send it).
    function execute(bytes32 id) external {
        Proposal storage p = _pending(id);
        if (p.approvals < threshold) revert NotEnoughApprovals(id, p.approvals, threshold);
        p.state = PROPOSAL_EXECUTED;
        if (p.op == OP_ADD_PARTY) {
            if (partyOf[p.admin] != 0) revert AdminTaken(p.admin, partyOf[p.admin]);
            _addParty(p.admin);
        } else if (p.op == OP_ADD_RELEASE) {
            _setRelease(id, p);
        } else {
            // Only this proposal (its nonce names the current suspension) can lift it.
            _releases[p.kind][p.digest].suspended = false;
            if (p.kind == RELEASE_MEASUREMENT) _allow(p.digest, true);
            emit SuspensionLifted(p.kind, p.digest, p.nonce);
        }
        emit ProposalExecuted(id, p.op);
    }

    /// @notice Any one party suspends a release at once; lifting it needs `threshold`.
    function suspend(uint8 kind, bytes32 digest) external {
        uint64 party = _callerParty();
        Release storage r = _existingRelease(kind, digest);
        if (r.suspended) revert AlreadySuspended(kind, digest);
        r.suspended = true;
        r.suspensions += 1;
        if (kind == RELEASE_MEASUREMENT) _allow(digest, false);
        emit ReleaseSuspended(kind, digest, party, r.suspensions);
    }

    // ---------------------------------------------------------------- views

    /// @notice True when the release exists, is not suspended and its window holds now.
    function releaseValid(uint8 kind, bytes32 digest) public view returns (bool) {
        Release storage r = _releases[kind][digest];
        return r.exists && !r.suspended && r.notBefore <= block.timestamp && block.timestamp < r.notAfter;
    }

    function getRelease(uint8 kind, bytes32 digest) external view returns (Release memory) {
        return _releases[kind][digest];
    }

    function getProposal(bytes32 id) external view returns (Proposal memory) {
        if (_proposals[id].state == 0) revert UnknownProposal(id);
        return _proposals[id];
    }

    /// @notice The id of a proposal (see the contract notes).
    function proposalId(
        uint8 op,
        uint8 kind,
        bytes32 digest,
        uint64 partyId,
        address admin,
        uint64 notBefore,
        uint64 notAfter,
        bytes32 sourcesHash,
        uint32 nonce
    ) public pure returns (bytes32) {
        return keccak256(abi.encode(op, kind, digest, partyId, admin, notBefore, notAfter, sourcesHash, nonce));
    }

    // ---------------------------------------------------------------- internals

    function _propose(
        uint64 proposer,
        uint8 op,
        uint8 kind,
        bytes32 digest,
        uint64 partyId,
        address admin,
        uint64 notBefore,
        uint64 notAfter,
        uint32 nonce,
        bytes32[] memory sources
    ) private returns (bytes32 id) {
        bytes32 sourcesHash = keccak256(abi.encodePacked(sources));
        id = proposalId(op, kind, digest, partyId, admin, notBefore, notAfter, sourcesHash, nonce);
        if (_proposals[id].state != 0) revert ProposalExists(id);
        _proposals[id] =
            Proposal(op, kind, PROPOSAL_PENDING, 1, nonce, partyId, notBefore, notAfter, proposer, admin, digest, sourcesHash);
        approvedBy[id][proposer] = true;
        emit ProposalCreated(id, proposer, op, kind, digest, partyId, admin, notBefore, notAfter, nonce, sources);
        emit ProposalApproved(id, proposer, 1);
    }

    function _setRelease(bytes32 id, Proposal storage p) private {
        Release storage r = _releases[p.kind][p.digest];
        // A release seen valid before is renewed as proposed; a new one waits out the notice.
        uint64 validFrom = p.notBefore;
        if (!r.exists || r.notBefore > block.timestamp) {
            uint64 earliest = uint64(block.timestamp) + noticePeriod;
            if (earliest > validFrom) validFrom = earliest;
        }
        if (p.notAfter <= validFrom) revert WindowEnded(id, p.notAfter, validFrom);
        if (p.kind == RELEASE_MODEL) {
            uint64 owner_ = modelParty[p.digest];
            if (owner_ != 0 && owner_ != p.partyId) revert ModelTaken(p.digest, owner_);
            modelParty[p.digest] = p.partyId;
            emit ModelRegistered(p.partyId, p.digest);
        }
        r.partyId = p.partyId;
        r.notBefore = validFrom;
        r.notAfter = p.notAfter;
        r.sources = p.sources;
        r.exists = true;
        if (p.kind == RELEASE_MEASUREMENT && !r.suspended) _allow(p.digest, true);
        emit ReleaseAdded(p.kind, p.digest, p.partyId, validFrom, p.notAfter, p.sources);
    }

    function _addParty(address admin) private {
        if (admin == address(0)) revert ZeroAddress();
        if (partyOf[admin] != 0) revert AdminTaken(admin, partyOf[admin]);
        uint64 partyId = ++partyCount;
        partyAdmin[partyId] = admin;
        partyOf[admin] = partyId;
        emit PartyRegistered(partyId, admin);
    }

    function _allow(bytes32 measurement, bool allowed) private {
        allowedMeasurement[measurement] = allowed;
        emit MeasurementAllowed(measurement, allowed);
    }

    function _callerParty() private view returns (uint64 party) {
        party = partyOf[msg.sender];
        if (party == 0) revert NotParty(msg.sender);
    }

    function _pending(bytes32 id) private view returns (Proposal storage p) {
        p = _proposals[id];
        if (p.state == 0) revert UnknownProposal(id);
        if (p.state != PROPOSAL_PENDING) revert ProposalNotPending(id);
    }

    function _existingRelease(uint8 kind, bytes32 digest) private view returns (Release storage r) {
        r = _releases[kind][digest];
        if (!r.exists) revert UnknownRelease(kind, digest);
    }

    /// @dev For the registry: an edge registers only with a measurement valid now.
    function _requireValidMeasurement(bytes32 measurement) internal view {
        if (!releaseValid(RELEASE_MEASUREMENT, measurement)) revert ReleaseNotValid(RELEASE_MEASUREMENT, measurement);
    }
}
