// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

import {BatchMerkle} from "./BatchMerkle.sol";

/// @title BatchCalldata
/// @notice On-chain decoder of a batch's published records (calldata v2, the format of
/// secure_ci/ledger/_calldata.py), for fraud proofs: it either rebuilds the batch's Merkle root
/// from the records or names the first rule they break.
/// @dev Checked on chain (each a fault code): truncation and trailing bytes, version and
/// flags, header (edge, first sequence number, count) against the anchored batch, reserved
/// bits of a record's kind, table indices in range, back references inside the batch, table
/// entries in order of first use and each used, an explicit task id that equals the default,
/// a device signature kept or left out where the canonical encoding does not, and finally the
/// root. Not checked on chain (the auditor reports them; a fraud proof of them reverts
/// NoFraud): duplicate table entries, and a record that starts a chain although an earlier
/// record of the same device in the batch is its prevRequest (or links to an earlier one than
/// the latest) - both need a map over the batch. Neither changes the records or the root.
library BatchCalldata {
    uint8 internal constant OK = 0;
    uint8 internal constant TRUNCATED = 1;
    uint8 internal constant TRAILING_BYTES = 2;
    uint8 internal constant BAD_VERSION = 3;
    uint8 internal constant HEADER_MISMATCH = 4;
    uint8 internal constant RESERVED_BITS = 5;
    uint8 internal constant BAD_INDEX = 6;
    uint8 internal constant BAD_BACK_REFERENCE = 7;
    uint8 internal constant NON_CANONICAL = 8;
    uint8 internal constant ROOT_MISMATCH = 9;

    uint256 private constant BODY = 91; // see _record
    uint256 private constant SIGNATURE_INTERVAL = 32;
    uint256 private constant HAS_SUCCESSOR = 1 << 200;
    uint256 private constant HAS_SIG = 1 << 201;

    bytes32 private constant TASK_REQUEST_TYPEHASH = keccak256(
        "TaskRequest(bytes32 taskId,address device,uint64 deviceSeq,bytes32 modelId,uint16 cut,"
        "bytes32 inputCommitment,address edge,uint64 deadline,bytes32 prevRequest)"
    );
    bytes32 private constant TASK_RESULT_TYPEHASH = keccak256(
        "TaskResult(bytes32 taskId,bytes32 requestHash,bytes32 outputCommitment,bytes32 measurement,"
        "bytes32 quoteId,uint8 status,uint32 latencyMs,uint64 edgeSeq)"
    );

    /// @dev Decoder state, in memory to keep the stack shallow.
    struct Cursor {
        uint256 pos;
        uint256 end;
        uint256 edge;
        uint256 firstSeq;
        bytes32 separator;
        uint256[3] offset; // tables: devices (20 B), models (32 B), enclaves (64 B)
        uint256[3] size;
        uint256[3] used; // entries used so far (first use must be in table order)
        uint256[] info; // per record: device | depth << 160 | flags
        bytes32[] requestHash;
        bytes32[] leaves;
        uint256[10] request; // the request's abi.encode words (typehash first)
        uint256[9] result; // the result's abi.encode words (typehash first)
    }

    /// @notice Fault code (OK when the records decode and rebuild `root`).
    function check(
        bytes calldata d,
        address edge,
        uint64 firstSeq,
        uint32 count,
        bytes32 root,
        bytes32 separator
    ) internal pure returns (uint8) {
        unchecked {
            Cursor memory c;
            c.end = d.length;
            c.edge = uint160(edge);
            c.firstSeq = firstSeq;
            c.separator = separator;
            uint8 fault = _header(d, c, count);
            if (fault != OK) return fault;
            c.info = new uint256[](count);
            c.requestHash = new bytes32[](count);
            c.leaves = new bytes32[](count);
            c.request[0] = uint256(TASK_REQUEST_TYPEHASH);
            c.request[7] = uint160(edge);
            c.result[0] = uint256(TASK_RESULT_TYPEHASH);
            for (uint256 i = 0; i < count; ++i) {
                fault = _record(d, c, i);
                if (fault != OK) return fault;
            }
            if (c.pos != c.end) return TRAILING_BYTES;
            for (uint256 t = 0; t < 3; ++t) {
                if (c.used[t] != c.size[t]) return NON_CANONICAL; // an entry no record uses
            }
            for (uint256 i = 0; i < count; ++i) {
                uint256 w = c.info[i];
                uint256 depth = (w >> 160) & 0xFFFFFFFF;
                bool signed = w & HAS_SUCCESSOR == 0 || depth % SIGNATURE_INTERVAL == SIGNATURE_INTERVAL - 1;
                if (signed != (w & HAS_SIG != 0)) return NON_CANONICAL;
            }
            if (BatchMerkle.root(c.leaves) != root) return ROOT_MISMATCH;
            return OK;
            }
    }

    function _header(bytes calldata d, Cursor memory c, uint32 count) private pure returns (uint8) {
        if (c.end < 34) return TRUNCATED;
        uint256 flags = _u(d, 1, 1);
        if (_u(d, 0, 1) != 2 || flags & ~uint256(1) != 0) return BAD_VERSION;
        if (_u(d, 2, 20) != c.edge || _u(d, 22, 8) != c.firstSeq || _u(d, 30, 4) != count) {
            return HEADER_MISMATCH;
        }
        c.pos = flags == 1 ? 70 : 34;
        uint256[3] memory width = [uint256(20), 32, 64];
        for (uint256 t = 0; t < 3; ++t) {
            if (c.pos + 2 > c.end) return TRUNCATED;
            c.size[t] = _u(d, c.pos, 2);
            c.offset[t] = c.pos + 2;
            c.pos = c.offset[t] + c.size[t] * width[t];
            if (c.pos > c.end) return TRUNCATED;
        }
        return OK;
    }

    /// @dev Decode record `i` at c.pos; its leaf goes to c.leaves[i].
    function _record(bytes calldata d, Cursor memory c, uint256 i) private pure returns (uint8) {
        unchecked {
            uint256 pos = c.pos;
            if (pos + 3 + BODY > c.end) return TRUNCATED;
            uint256 kind = _u(d, pos, 1);
            if (kind & ~uint256(7) != 0) return RESERVED_BITS;
            uint256 device;
            uint256 w;
            if (kind & 1 != 0) {
                if (pos + 35 + BODY > c.end) return TRUNCATED;
                uint256 dev = _u(d, pos + 1, 2);
                if (!_use(c, 0, dev)) return dev < c.size[0] ? NON_CANONICAL : BAD_INDEX;
                device = _u(d, c.offset[0] + 20 * dev, 20);
                c.request[9] = _u(d, pos + 3, 32);
                pos += 35;
            } else {
                uint256 back = _u(d, pos + 1, 2);
                if (back == 0 || back > i) return BAD_BACK_REFERENCE;
                uint256 j = i - back;
                uint256 prev = c.info[j];
                c.info[j] = prev | HAS_SUCCESSOR;
                device = uint160(prev);
                w = (((prev >> 160) & 0xFFFFFFFF) + 1) << 160;
                c.request[9] = uint256(c.requestHash[j]);
                pos += 3;
            }
            uint8 fault = _body(d, c, pos, device);
            if (fault != OK) return fault;
            pos += BODY;
            uint256 taskId = c.result[1]; // the default task id, from _body
            if (kind & 2 != 0) {
                if (pos + 32 > c.end) return TRUNCATED;
                uint256 explicitId = _u(d, pos, 32);
                if (explicitId == taskId) return NON_CANONICAL;
                taskId = explicitId;
                pos += 32;
            }
            if (kind & 4 != 0) {
                if (pos + 65 > c.end) return TRUNCATED;
                pos += 65;
                w |= HAS_SIG;
            }
            c.pos = pos;
            c.info[i] = w | device;
            _finish(c, i, taskId);
            return OK;
            }
    }

    /// @dev The record body at `pos` into c.request / c.result (c.result[1]: the default id).
    /// body = deviceSeq u64 | model u16 | cut u16 | input 32 | deadline u64 | output 32
    ///        | enclave u16 | status u8 | latency u32
    function _body(bytes calldata d, Cursor memory c, uint256 pos, uint256 device) private pure returns (uint8) {
        unchecked {
            uint256 head; // deviceSeq 8 | model 2 | cut 2 | ...
            uint256 tail; // enclave 2 | status 1 | latency 4 | ...
            uint256 p;
            assembly ("memory-safe") {
                p := add(d.offset, pos)
                head := calldataload(p)
                tail := calldataload(add(p, 84))
            }
            uint256 model = (head >> 176) & 0xFFFF;
            uint256 enclave = tail >> 240;
            if (!_use(c, 1, model)) return model < c.size[1] ? NON_CANONICAL : BAD_INDEX;
            if (!_use(c, 2, enclave)) return enclave < c.size[2] ? NON_CANONICAL : BAD_INDEX;
            model = c.offset[1] + 32 * model; // where the model id is
            enclave = c.offset[2] + 64 * enclave; // where measurement || quote id is
            assembly ("memory-safe") {
                let rq := mload(add(c, 0x160)) // c.request (Cursor member 11)
                let rs := mload(add(c, 0x180)) // c.result (Cursor member 12)
                let input := calldataload(add(p, 12))
                mstore(add(rq, 0x40), device)
                mstore(add(rq, 0x60), shr(192, head))
                mstore(add(rq, 0x80), calldataload(add(d.offset, model)))
                mstore(add(rq, 0xa0), and(shr(160, head), 0xffff))
                mstore(add(rq, 0xc0), input)
                mstore(add(rq, 0x100), shr(192, calldataload(add(p, 44))))
                mstore(add(rs, 0x60), calldataload(add(p, 52)))
                mstore(add(rs, 0x80), calldataload(add(d.offset, enclave)))
                mstore(add(rs, 0xa0), calldataload(add(d.offset, add(enclave, 32))))
                mstore(add(rs, 0xc0), and(shr(232, tail), 0xff))
                mstore(add(rs, 0xe0), and(shr(200, tail), 0xffffffff))
                // the default task id, keccak256(device || inputCommitment), into rs[1]
                mstore(0x00, shl(96, device))
                mstore(0x14, input)
                mstore(add(rs, 0x20), keccak256(0x00, 0x34))
            }
            return OK;
        }
    }

    /// @dev Hash record `i`'s request and result; its leaf goes to c.leaves[i].
    function _finish(Cursor memory c, uint256 i, uint256 taskId) private pure {
        unchecked {
            c.request[1] = taskId;
            bytes32 requestHash = _hashWords(c.request);
            c.requestHash[i] = requestHash;
            c.result[1] = taskId;
            c.result[2] = uint256(requestHash);
            c.result[8] = c.firstSeq + i;
            c.leaves[i] = _leaf(c.firstSeq + i, c.separator, _hashWords(c.result));
            }
    }

    /// @dev keccak256(keccak256(abi.encode(seq, keccak256(0x1901 || separator || structHash))))
    /// in scratch memory (the decoder allocates nothing per record).
    function _leaf(uint256 seq, bytes32 separator, bytes32 structHash) private pure returns (bytes32 h) {
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, shl(240, 0x1901))
            mstore(add(p, 2), separator)
            mstore(add(p, 34), structHash)
            let digest := keccak256(p, 66)
            mstore(0x00, seq)
            mstore(0x20, digest)
            mstore(0x00, keccak256(0x00, 0x40))
            h := keccak256(0x00, 0x20)
        }
    }

    /// @dev Table `t` entry `index` used: in range and no later than the next unused entry.
    function _use(Cursor memory c, uint256 t, uint256 index) private pure returns (bool) {
        unchecked {
            if (index >= c.size[t] || index > c.used[t]) return false;
            if (index == c.used[t]) c.used[t] = index + 1;
            return true;
            }
    }

    /// @dev `n` (1..32) big-endian bytes of `d` at `pos`, as an unsigned integer.
    function _u(bytes calldata d, uint256 pos, uint256 n) private pure returns (uint256 v) {
        assembly ("memory-safe") {
            v := shr(sub(256, mul(8, n)), calldataload(add(d.offset, pos)))
        }
    }

    function _hashWords(uint256[10] memory words) private pure returns (bytes32 h) {
        assembly ("memory-safe") {
            h := keccak256(words, 320)
        }
    }

    function _hashWords(uint256[9] memory words) private pure returns (bytes32 h) {
        assembly ("memory-safe") {
            h := keccak256(words, 288)
        }
    }
}
