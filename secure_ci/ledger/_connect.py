"""open_ledger: connect to a chain backend and bind (or deploy) the SecureCILedger contract."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3

from secure_ci.exceptions import ChainError, LedgerError
from secure_ci.ledger._artifacts import ContractArtifact, load_artifact
from secure_ci.ledger._backends import INPROCESS, make_provider, send_value, translate_errors
from secure_ci.ledger._chain import as_address, as_uint
from secure_ci.ledger._client import LedgerClient

__all__ = ["DEFAULT_CHALLENGE_WINDOW", "deploy_contract", "open_ledger"]

DEFAULT_CHALLENGE_WINDOW = 3600
"""Seconds an edge has to answer a challenge, fixed at deployment."""
_OWNER_FUNDING = 10**21  # 1,000 ether from a development chain's faucet
_TIMEOUT = 60.0


async def deploy_contract(
    w3: AsyncWeb3[Any],
    artifact: ContractArtifact,
    owner: LocalAccount,
    challenge_window: int = DEFAULT_CHALLENGE_WINDOW,
) -> tuple[str, int]:
    """Deploy SecureCILedger owned by ``owner``; its address and the block it was mined in."""
    factory = w3.eth.contract(abi=list(artifact.abi), bytecode=artifact.bytecode)
    nonce = await w3.eth.get_transaction_count(owner.address, "pending")
    tx = await factory.constructor(
        as_uint(challenge_window, "challenge_window", 64)
    ).build_transaction({"from": owner.address, "nonce": nonce})
    tx_hash = await w3.eth.send_raw_transaction(owner.sign_transaction(tx).raw_transaction)
    receipt = await w3.eth.wait_for_transaction_receipt(
        tx_hash, timeout=_TIMEOUT, poll_latency=0.02
    )
    address = receipt["contractAddress"]
    if receipt["status"] != 1 or address is None:
        raise ChainError("contract deployment failed")
    return str(address), int(receipt["blockNumber"])


@contextlib.asynccontextmanager
async def open_ledger(
    backend: str = INPROCESS,
    *,
    contract_address: str | None = None,
    deployer: LocalAccount | None = None,
    challenge_window: int = DEFAULT_CHALLENGE_WINDOW,
    artifact: ContractArtifact | None = None,
) -> AsyncIterator[LedgerClient]:
    """Connect to ``backend`` (``"inprocess"`` or an http URL) and bind the contract.

    Without ``contract_address`` the contract is deployed by ``deployer`` (a fresh key when
    omitted); an owner without balance is funded from the node's faucet account
    (development chains only). With ``contract_address``, ``deployer`` is the owner key
    used for owner-only calls (a fresh, powerless key when omitted).
    """
    artifact = artifact or load_artifact()
    if backend == INPROCESS and contract_address is not None:
        raise LedgerError("the in-process chain starts empty: it has no contract to bind")
    w3 = AsyncWeb3(make_provider(backend))
    try:
        with translate_errors(artifact):
            chain_id = int(await w3.eth.chain_id)
            owner: LocalAccount = deployer or Account.create()
            deployed_at: int | None = None
            if contract_address is None:
                if await w3.eth.get_balance(owner.address) == 0:  # dev chain: use its faucet
                    await send_value(w3, owner, owner.address, _OWNER_FUNDING, _TIMEOUT)
                contract_address, deployed_at = await deploy_contract(
                    w3, artifact, owner, challenge_window
                )
            elif not await w3.eth.get_code(as_address(contract_address, "contract")):
                raise ChainError(f"no contract at {contract_address}")
        client = LedgerClient(w3, artifact, contract_address, owner, chain_id)
        client.deployment_block = deployed_at
        yield client
    finally:
        with contextlib.suppress(Exception):
            await w3.provider.disconnect()
