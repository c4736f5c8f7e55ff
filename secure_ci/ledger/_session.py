"""The plumbing under LedgerClient: contract binding, calls, signed transactions, chain clock.

Transactions are signed locally by the account responsible for them, one at a time per
account (nonces); node failures and reverts are translated at this boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3
from web3.logs import DISCARD
from web3.types import RPCEndpoint

from secure_ci.exceptions import ChainError, ContractRevertError
from secure_ci.ledger._artifacts import ContractArtifact
from secure_ci.ledger._backends import send_value, translate_errors
from secure_ci.ledger._chain import as_address
from secure_ci.ledger._records import LedgerDomain

__all__ = ["ContractSession"]


class ContractSession:
    """One deployed SecureCILedger on one node: calls, signed transactions, chain time."""

    def __init__(
        self,
        w3: AsyncWeb3[Any],
        artifact: ContractArtifact,
        address: str,
        owner: LocalAccount,
        chain_id: int,
        *,
        receipt_timeout: float = 60.0,
    ) -> None:
        self._w3 = w3
        self._artifact = artifact
        self._contract = w3.eth.contract(address=as_address(address), abi=list(artifact.abi))
        self.address = self._contract.address
        self.owner = owner
        self.chain_id = chain_id
        self._receipt_timeout = receipt_timeout
        self._locks: dict[str, asyncio.Lock] = {}
        self.deployment_block: int | None = None
        """The block the contract was deployed in, when this session deployed it."""

    @property
    def domain(self) -> LedgerDomain:
        """The EIP-712 domain records are signed under on this ledger."""
        return LedgerDomain(self.chain_id, bytes.fromhex(self.address[2:]))

    # ------------------------------------------------------------------ plumbing

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return translate_errors(self._artifact)

    async def _call(self, fn: Any) -> Any:
        with self._errors():
            return await fn.call()

    async def _transact(self, account: LocalAccount, fn: Any, *, gas_margin: float = 0.0) -> Any:
        """Sign and send ``fn`` from ``account``; the receipt once mined (reverts raise).

        ``gas_margin`` adds that fraction to the node's estimate, for calls whose gas depends
        on the block they are mined in (its timestamp)."""
        lock = self._locks.setdefault(account.address, asyncio.Lock())
        async with lock:
            with self._errors():
                nonce = await self._w3.eth.get_transaction_count(account.address, "pending")
                tx = await fn.build_transaction({"from": account.address, "nonce": nonce})
                if gas_margin:
                    tx["gas"] = int(tx["gas"] * (1 + gas_margin))
                signed = account.sign_transaction(tx)
                tx_hash = await self._w3.eth.send_raw_transaction(signed.raw_transaction)
                receipt = await self._w3.eth.wait_for_transaction_receipt(
                    tx_hash, timeout=self._receipt_timeout, poll_latency=0.02
                )
        if receipt["status"] != 1:
            raise ContractRevertError("transaction reverted")
        return receipt

    def _event_args(self, event: str, receipt: Any) -> Any:
        logs = getattr(self._contract.events, event)().process_receipt(receipt, errors=DISCARD)
        if not logs:
            raise ChainError(f"transaction mined without a {event} event")
        return logs[0]["args"]

    # ------------------------------------------------------------------ chain

    async def block_number(self) -> int:
        """The latest block number."""
        with self._errors():
            return int(await self._w3.eth.block_number)

    async def timestamp(self) -> int:
        """The latest block's timestamp (the contract's ``block.timestamp`` clock)."""
        with self._errors():
            return int((await self._w3.eth.get_block("latest"))["timestamp"])

    async def advance_time(self, seconds: int) -> None:
        """Move a development chain's clock forward and mine a block (anvil, in-process)."""
        with self._errors():
            await self._w3.provider.make_request(RPCEndpoint("evm_increaseTime"), [seconds])
            await self._w3.provider.make_request(RPCEndpoint("evm_mine"), [])

    async def fund(self, address: object, wei: int) -> None:
        """Send ``wei`` to ``address`` from the node's faucet account, else from the owner."""
        with self._errors():
            await send_value(self._w3, self.owner, as_address(address), wei, self._receipt_timeout)
