// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.30;

import {BatchCalldata} from "./BatchCalldata.sol";

/// @title The fraud-proof decoder as a contract of its own
/// @notice SecureCILedger creates one in its constructor and calls it from proveFraud: the
/// decoder's code then counts against this contract's size, not the ledger's (EIP-170 caps
/// each at 24,576 bytes). Pure: it holds nothing and trusts nothing it is given.
contract BatchChecker {
    /// @notice BatchCalldata.check: the fault code of `records` (OK when they decode and
    /// rebuild `root`) for the batch (edge, firstSeq, count) under the EIP-712 `separator`.
    function check(
        bytes calldata records,
        address edge,
        uint64 firstSeq,
        uint32 count,
        bytes32 root,
        bytes32 separator
    ) external pure returns (uint8) {
        return BatchCalldata.check(records, edge, firstSeq, count, root, separator);
    }
}
