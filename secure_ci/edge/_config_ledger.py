"""The edge configuration's ``[ledger]`` table: where the edge registers and anchors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from secure_ci.edge._config_values import bounded, parse_address, path_of, table_of
from secure_ci.exceptions import ConfigError
from secure_ci.ledger._deployment import Deployment, check_rpc_url

__all__ = ["LedgerSettings", "parse_ledger"]


@dataclass(frozen=True)
class LedgerSettings:
    """The ``[ledger]`` table: where the edge registers itself and anchors its journal.

    Either ``deployment`` (the deployment file, read by the CLI, which fills ``rpc``,
    ``contract``, ``chain_id`` and ``deployment_block`` through :meth:`with_deployment`) or
    ``rpc`` and ``contract``. Without a chain id the edge learns it from the chain at start.
    """

    rpc: str | None
    contract: bytes | None
    party_id: int
    operator_key_file: Path | None = None
    endpoint: str | None = None
    batch_records: int = 256
    batch_seconds: float = 2.0
    refresh_seconds: float = 1.0
    fund_wei: int = 10**17
    chain_id: int | None = None
    deployment_block: int = 0
    deployment: Path | None = None

    def __post_init__(self) -> None:
        if self.deployment is None and (self.rpc is None or self.contract is None):
            raise ConfigError("[ledger] needs deployment, or rpc and contract")
        if self.rpc is not None:
            check_rpc_url(self.rpc, "ledger.rpc")
        if self.contract is not None:
            if not isinstance(self.contract, bytes) or len(self.contract) != 20:
                raise ConfigError("ledger.contract must be a 20-byte address")
            if self.contract == bytes(20):
                raise ConfigError("ledger.contract must not be the zero address")
        bounded("ledger.party_id", self.party_id, 1, 2**64 - 1)
        if self.endpoint is not None and (
            not isinstance(self.endpoint, str) or not 0 < len(self.endpoint) <= 256
        ):
            raise ConfigError("ledger.endpoint must be a non-empty string of at most 256 chars")
        bounded("ledger.batch_records", self.batch_records, 1, 1 << 16)
        bounded("ledger.batch_seconds", self.batch_seconds, 0.001, 86_400.0)
        bounded("ledger.refresh_seconds", self.refresh_seconds, 0.001, 86_400.0)
        bounded("ledger.fund_wei", self.fund_wei, 0, 2**128)
        bounded("ledger.deployment_block", self.deployment_block, 0, 2**63)
        if self.chain_id is not None:
            bounded("ledger.chain_id", self.chain_id, 1, 2**63)
        if not all(isinstance(v, int) for v in (self.party_id, self.batch_records, self.fund_wei)):
            raise ConfigError("ledger.party_id, batch_records and fund_wei must be integers")

    def with_deployment(self, deployment: Deployment) -> LedgerSettings:
        """These settings on ``deployment``'s chain (an ``rpc`` given here is kept)."""
        if self.contract not in (None, deployment.contract):
            raise ConfigError("ledger.contract differs from the deployment's contract")
        if self.chain_id not in (None, deployment.chain_id):
            raise ConfigError("ledger.chain_id differs from the deployment's chain id")
        return replace(
            self,
            rpc=self.rpc or deployment.rpc,
            contract=deployment.contract,
            chain_id=deployment.chain_id,
            deployment_block=deployment.deployment_block,
            deployment=None,
        )


_LEDGER = {
    "deployment",
    "chain_id",
    "rpc",
    "contract",
    "operator_key_file",
    "party_id",
    "endpoint",
    "batch_records",
    "batch_seconds",
    "refresh_seconds",
    "fund_wei",
}


def parse_ledger(doc: Mapping[str, Any], base_dir: Path) -> LedgerSettings | None:
    """The optional ``[ledger]`` table (the domain then comes from the chain, not the file)."""
    if "ledger" not in doc:
        return None
    table = table_of(doc, "ledger")
    unknown = set(table) - _LEDGER
    if unknown:
        raise ConfigError(f"unknown ledger keys: {', '.join(sorted(unknown))}")
    missing = {"operator_key_file", "party_id"} - set(table)
    if "deployment" not in table:
        missing |= {"rpc", "contract"} - set(table)
    if missing:
        raise ConfigError(f"[ledger] needs {', '.join(sorted(missing))} (or a deployment file)")
    if "chain_id" in doc or "contract" in doc:
        raise ConfigError("with [ledger], chain_id and contract come from the chain: remove them")
    contract = table.get("contract")
    return LedgerSettings(
        rpc=table.get("rpc"),
        contract=None if contract is None else parse_address(contract),
        party_id=table["party_id"],
        operator_key_file=path_of(table["operator_key_file"], base_dir, "ledger.operator_key_file"),
        endpoint=table.get("endpoint"),
        batch_records=table.get("batch_records", 256),
        batch_seconds=table.get("batch_seconds", 2.0),
        refresh_seconds=table.get("refresh_seconds", 1.0),
        fund_wei=table.get("fund_wei", 10**17),
        chain_id=table.get("chain_id"),
        deployment=path_of(table.get("deployment"), base_dir, "ledger.deployment"),
    )
