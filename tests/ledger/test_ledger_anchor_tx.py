"""The hand-built anchoring transaction: same bytes and same effect as web3's contract path."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from eth_abi.abi import encode
from eth_account import Account
from hexbytes import HexBytes
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.exceptions import ChainError, ContractRevertError, LedgerError
from secure_ci.ledger import LedgerClient, open_ledger
from secure_ci.ledger._anchor_tx import (
    ANCHOR_EXECUTION_GAS,
    anchor_call_data,
    anchor_gas_limit,
    anchored_head,
    calldata_tokens,
)
from secure_ci.ledger._merkle import chain_head
from secure_ci.ledger._records import keccak256
from secure_ci.testing import LedgerWorld, ledger_world

ON_MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
ZERO = bytes(32)
TOPIC = keccak256(b"BatchAnchored(address,uint64,bytes32,uint64,uint32,bytes32)")
CONTRACT = "0x" + "ab" * 20


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def ledger() -> AsyncIterator[LedgerClient]:
    async with open_ledger("inprocess") as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(ledger: LedgerClient) -> LedgerWorld:
    return await ledger_world(ledger, edges=3, devices=1)


def _web3_fn(ledger: LedgerClient, root: bytes, records: bytes) -> object:
    return ledger._contract.functions.anchorBatch(0, root, 0, 3, ZERO, records)


@ON_MODULE_LOOP
async def test_call_data_is_web3s_encoding(ledger: LedgerClient) -> None:
    for records in (b"", b"\x00\x01" * 100, bytes(range(256)) * 3):
        fn = _web3_fn(ledger, b"\x05" * 32, records)
        web3_data = HexBytes(fn._encode_transaction_data())  # type: ignore[attr-defined]
        assert anchor_call_data(0, b"\x05" * 32, 0, 3, ZERO, records) == bytes(web3_data)


@ON_MODULE_LOOP
async def test_raw_path_has_the_web3_paths_effect(world: LedgerWorld) -> None:
    """The same batch anchored by two fresh edges, once through each path: same chain state,
    same transaction input and the same gas."""
    ledger = world.ledger
    raw_edge, web3_edge = world.edges[0], world.edges[1]
    root, records = keccak256(b"root"), bytes(range(1, 256)) * 8 + bytes(500)
    raw = await ledger.anchor_batch(raw_edge, 0, root, 0, 3, ZERO, records)
    receipt = await ledger._transact(web3_edge, _web3_fn(ledger, root, records))
    assert raw.new_head == chain_head(ZERO, root, keccak256(records), 0, 3)
    assert raw.gas_used == int(receipt["gasUsed"])
    assert raw.gas_used <= anchor_gas_limit(anchor_call_data(0, root, 0, 3, ZERO, records))
    for edge in (raw_edge, web3_edge):
        state = await ledger.edge_state(edge.address)
        assert (state.next_batch_id, state.next_seq, state.head) == (1, 3, raw.new_head)
        assert await ledger.batch_calldata(edge.address, 0) == records
    raw_tx = await ledger._w3.eth.get_transaction(HexBytes(raw.tx_hash))
    web3_tx = await ledger._w3.eth.get_transaction(receipt["transactionHash"])
    assert bytes(raw_tx["input"]) == bytes(web3_tx["input"])


@ON_MODULE_LOOP
async def test_reverts_keep_their_custom_error(world: LedgerWorld) -> None:
    ledger, edge = world.ledger, world.edges[2]
    with pytest.raises(ContractRevertError) as info:
        await ledger.anchor_batch(edge, 1, keccak256(b"r"), 0, 1, ZERO, b"")
    assert info.value.reason == "BatchGap"
    # a mined failure that does not revert when replayed (out of gas) is still reported
    data = anchor_call_data(0, keccak256(b"r"), 0, 1, ZERO, b"")
    with pytest.raises(ContractRevertError, match="transaction reverted"):
        await ledger._send_data(edge, data, 21_000 + 10 * calldata_tokens(data))
    assert (await ledger.edge_state(edge.address)).next_batch_id == 0
    await ledger.anchor_batch(edge, 0, keccak256(b"r"), 0, 1, ZERO, b"")


@ON_MODULE_LOOP
async def test_rejected_transaction_is_a_ledger_error(ledger: LedgerClient) -> None:
    """A node refuses a transaction its sender cannot pay for: LedgerError, not py-evm's."""
    with pytest.raises(LedgerError, match="balance"):
        await ledger.anchor_batch(Account.create(), 0, keccak256(b"r"), 0, 1, ZERO, b"")


@given(st.binary(max_size=600))
def test_tokens_and_gas_limit(data: bytes) -> None:
    zeros = sum(1 for b in data if b == 0)
    assert calldata_tokens(data) == zeros + 4 * (len(data) - zeros)
    cancun = 21_000 + 4 * calldata_tokens(data) + ANCHOR_EXECUTION_GAS
    assert anchor_gas_limit(data) >= max(cancun, 21_000 + 10 * calldata_tokens(data))


def _log(address: str, topic: bytes, data: bytes) -> dict[str, object]:
    return {"address": address, "topics": [HexBytes(topic)], "data": HexBytes(data)}


def test_anchored_head_reads_only_the_contracts_event() -> None:
    head = keccak256(b"head")
    event = encode(["bytes32", "uint64", "uint32", "bytes32"], [ZERO, 1, 2, head])
    logs = [_log("0x" + "cd" * 20, TOPIC, event), _log(CONTRACT, keccak256(b"x"), event)]
    logs.append({"address": CONTRACT, "topics": ["0x" + TOPIC.hex()], "data": "0x" + event.hex()})
    assert anchored_head({"logs": logs}, CONTRACT.upper().replace("0X", "0x")) == head
    for bad in ({"logs": logs[:2]}, {}, {"logs": [_log(CONTRACT, TOPIC, event[:64])]}):
        with pytest.raises(ChainError):
            anchored_head(bad, CONTRACT)
    with pytest.raises(ChainError):
        anchored_head({"logs": [{"address": CONTRACT, "topics": [7], "data": b""}]}, CONTRACT)
