"""The in-process chain: py-evm's Prague rules, with transactions that hash once and a short
repr; hashes, receipts and lookups agree with the signed raw transaction."""

from __future__ import annotations

import asyncio
from typing import Any

from eth_account import Account
from web3 import AsyncWeb3

from secure_ci.ledger._backends import InProcessProvider, _LegacyTransaction
from secure_ci.ledger._records import keccak256


async def _send_big_transaction() -> tuple[Any, Any, Any, Any]:
    provider = InProcessProvider()
    w3 = AsyncWeb3(provider)
    faucet = (await w3.eth.accounts)[0]
    sender = Account.create()
    await w3.eth.wait_for_transaction_receipt(
        await w3.eth.send_transaction({"from": faucet, "to": sender.address, "value": 10**20})
    )
    data = bytes(range(256)) * 1024  # 256 KiB of calldata, as an anchoring batch carries
    tx = {
        "to": "0x" + "42" * 20,
        "data": data,
        "gas": 21_000 + 40 * len(data) + 100_000,  # covers the EIP-7623 calldata floor
        "gasPrice": await w3.eth.gas_price,
        "nonce": 0,
        "chainId": await w3.eth.chain_id,
        "value": 0,
    }
    signed = sender.sign_transaction(tx)
    tx_hash = await w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = await w3.eth.wait_for_transaction_receipt(tx_hash)
    fetched = await w3.eth.get_transaction(tx_hash)
    return provider, signed, receipt, fetched


def test_large_transaction_hash_receipt_and_lookup_agree() -> None:
    provider, signed, receipt, fetched = asyncio.run(_send_big_transaction())
    expected = keccak256(bytes(signed.raw_transaction))
    assert bytes(signed.hash) == expected
    assert bytes(receipt["transactionHash"]) == expected
    assert receipt["status"] == 1
    assert bytes(fetched["hash"]) == expected
    assert bytes(fetched["input"]) == bytes(range(256)) * 1024
    chain = provider.ethereum_tester.backend.chain
    block = chain.get_canonical_block_by_number(receipt["blockNumber"])
    (mined,) = block.transactions
    assert isinstance(mined, _LegacyTransaction)
    assert mined.hash == expected == mined.hash  # computed once, then cached
    assert len(repr(mined)) < 200
    assert chain.get_vm().fork == "prague"
