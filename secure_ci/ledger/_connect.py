"""open_ledger: connect to a chain backend and bind (or deploy) the SecureCILedger contract."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import AsyncWeb3

from secure_ci.exceptions import ChainError, ConfigError, LedgerError
from secure_ci.ledger._artifacts import ContractArtifact, load_artifact
from secure_ci.ledger._backends import INPROCESS, make_provider, send_value, translate_errors
from secure_ci.ledger._chain import as_address, as_uint
from secure_ci.ledger._client import LedgerClient

__all__ = ["DEFAULT_CHALLENGE_WINDOW", "GovernanceSettings", "deploy_contract", "open_ledger"]

DEFAULT_CHALLENGE_WINDOW = 3600
"""Seconds an edge has to answer a challenge, fixed at deployment."""


@dataclass(frozen=True)
class GovernanceSettings:
    """Fixed at deployment: the founding parties besides the deployer's (party 1, 2, ...
    follow in this order), the approvals a proposal needs, and the notice period (seconds)
    before a newly approved release becomes valid."""

    founders: tuple[str, ...] = ()
    threshold: int = 1
    notice_period: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int):
            raise ConfigError("the threshold must be a whole number")
        if not 1 <= self.threshold <= 1 + len(self.founders):
            raise ConfigError(
                f"the threshold must be 1..{1 + len(self.founders)} (the founding parties, "
                "the deployer's included)"
            )
        if not isinstance(self.notice_period, int) or not 0 <= self.notice_period < 2**63:
            raise ConfigError("the notice period must be a whole number of seconds >= 0")
        if len({f.lower() for f in self.founders}) != len(self.founders):
            raise ConfigError("a founding party's admin is listed twice")


_OWNER_FUNDING = 10**21  # 1,000 ether from a development chain's faucet
_TIMEOUT = 60.0


async def deploy_contract(
    w3: AsyncWeb3[Any],
    artifact: ContractArtifact,
    owner: LocalAccount,
    challenge_window: int = DEFAULT_CHALLENGE_WINDOW,
    governance: GovernanceSettings | None = None,
) -> tuple[str, int]:
    """Deploy SecureCILedger with ``owner`` as party 1's admin; its address and block."""
    governance = governance or GovernanceSettings()
    factory = w3.eth.contract(abi=list(artifact.abi), bytecode=artifact.bytecode)
    nonce = await w3.eth.get_transaction_count(owner.address, "pending")
    tx = await factory.constructor(
        as_uint(challenge_window, "challenge_window", 64),
        [as_address(f, "founder") for f in governance.founders],
        as_uint(governance.threshold, "threshold", 32),
        as_uint(governance.notice_period, "notice_period", 64),
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
    governance: GovernanceSettings | None = None,
) -> AsyncIterator[LedgerClient]:
    """Connect to ``backend`` (``"inprocess"`` or an http URL) and bind the contract.

    Without ``contract_address`` the contract is deployed by ``deployer`` (a fresh key when
    omitted), which administers party 1 under ``governance`` (by default one party, a
    threshold of 1 and no notice period); an owner without balance is funded from the node's
    faucet account (development chains only). With ``contract_address``, ``deployer`` is the
    key the session's governance calls are signed with (a fresh, powerless key when omitted).
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
                    w3, artifact, owner, challenge_window, governance
                )
            elif not await w3.eth.get_code(as_address(contract_address, "contract")):
                raise ChainError(f"no contract at {contract_address}")
        client = LedgerClient(w3, artifact, contract_address, owner, chain_id)
        client.deployment_block = deployed_at
        yield client
    finally:
        with contextlib.suppress(Exception):
            await w3.provider.disconnect()
