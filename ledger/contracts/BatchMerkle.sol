// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @title BatchMerkle
/// @notice Positional Merkle trees over a batch's leaves (secure_ci/ledger/_merkle.py is the
/// same tree in Python).
/// @dev A tree over n >= 1 leaves: level 0 is the leaves in sequence order; level k+1 pairs
/// the nodes (2j, 2j+1) of level k as keccak256(left || right) (position order, never
/// sorted); a level of odd length promotes its last node unchanged. The root is the single
/// node of the last level (the leaf itself when n = 1). A proof of leaf i is the list of
/// siblings that exist on the way up, bottom first: its length is a function of (i, n), the
/// side of each sibling is the bit of i at that level, so a proof proves one position only.
library BatchMerkle {
    error InvalidProof();

    /// @notice The root that `proof` leads to from `leafHash` at position `index` of `count`
    /// leaves; reverts InvalidProof when the proof has the wrong length for that position.
    function rootFromProof(bytes32 leafHash, uint256 index, uint256 count, bytes32[] calldata proof)
        internal
        pure
        returns (bytes32 node)
    {
        if (index >= count) revert InvalidProof();
        node = leafHash;
        uint256 used;
        uint256 size = count;
        while (size > 1) {
            if (index ^ 1 < size) {
                if (used >= proof.length) revert InvalidProof();
                bytes32 sibling = proof[used++];
                node = index & 1 == 0 ? _pair(node, sibling) : _pair(sibling, node);
            }
            index >>= 1;
            size = (size + 1) >> 1;
        }
        if (used != proof.length) revert InvalidProof();
    }

    /// @notice The root of a tree over `nodes` (overwritten: it is the working level).
    function root(bytes32[] memory nodes) internal pure returns (bytes32) {
        unchecked {
            uint256 size = nodes.length;
            while (size > 1) {
                uint256 half = size >> 1;
                for (uint256 j = 0; j < half; ++j) {
                    nodes[j] = _pair(nodes[2 * j], nodes[2 * j + 1]);
                }
                if (size & 1 == 1) {
                    nodes[half] = nodes[size - 1];
                    size = half + 1;
                } else {
                    size = half;
                }
            }
            return nodes[0];
            }
    }

    function _pair(bytes32 a, bytes32 b) private pure returns (bytes32 h) {
        assembly ("memory-safe") {
            mstore(0x00, a)
            mstore(0x20, b)
            h := keccak256(0x00, 0x40)
        }
    }
}
