"""Registry reads: who is registered on the ledger, from the contract's state and events.

Devices need the edge registry (endpoint, enclave key, measurement, quote id, whether the
edge is active and its measurement allowed now) to pick and check an edge; edges need the
device registry as a stream of events. Event reads start at the deployment block and go in
chunks, because nodes cap the block range of ``eth_getLogs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_typing import HexStr

from secure_ci.exceptions import ChainError
from secure_ci.ledger._chain import as_address
from secure_ci.ledger._session import ContractSession

__all__ = ["LOG_CHUNK_BLOCKS", "RegisteredEdge", "RegistryReads"]

LOG_CHUNK_BLOCKS = 10_000
"""Blocks per ``eth_getLogs`` query (nodes cap log ranges)."""


@dataclass(frozen=True)
class RegisteredEdge:
    """An edge as the ledger knows it now."""

    address: bytes
    party_id: int
    measurement: bytes
    quote_id: bytes
    endpoint: str
    active: bool
    measurement_allowed: bool  # a measurement release valid now (window, not suspended)

    @property
    def usable(self) -> bool:
        """Active, with a measurement the ledger allows now."""
        return self.active and self.measurement_allowed

    def as_json(self) -> dict[str, Any]:
        return {
            "edge": "0x" + self.address.hex(),
            "party": self.party_id,
            "endpoint": self.endpoint,
            "measurement": self.measurement.hex(),
            "quote_id": self.quote_id.hex(),
            "active": self.active,
            "measurement_allowed": self.measurement_allowed,
        }


class RegistryReads(ContractSession):
    """Registry queries over the bound contract (mixed into LedgerClient)."""

    async def device_events(self, first: int, last: int) -> list[tuple[bytes, bool]]:
        """``(device, registered)`` for every DeviceRegistered/DeviceRevoked in blocks
        ``first..last``, in the order the chain applied them."""
        events = self._contract.events
        with self._errors():
            added = await events.DeviceRegistered.get_logs(from_block=first, to_block=last)
            removed = await events.DeviceRevoked.get_logs(from_block=first, to_block=last)
        tagged = [(e, True) for e in added] + [(e, False) for e in removed]
        tagged.sort(key=lambda t: (int(t[0]["blockNumber"]), int(t[0]["logIndex"])))
        return [(bytes.fromhex(str(e["args"]["device"])[2:]), on) for e, on in tagged]

    async def registered_edge(self, edge_addr: object) -> RegisteredEdge | None:
        """The edge's registration now, None if it was never registered."""
        address = as_address(edge_addr, "edge")
        fns = self._contract.functions
        *_, registered, active, measurement = await self._call(fns.edgeState(address))
        if not registered:
            return None
        party_id, quote_id, endpoint = await self._call(fns.edgeInfo(address))
        allowed = bool(await self._call(fns.releaseValid(0, bytes(measurement))))
        return RegisteredEdge(
            bytes.fromhex(address[2:]), int(party_id), bytes(measurement), bytes(quote_id),
            str(endpoint), bool(active), allowed,
        )  # fmt: skip

    async def registered_edges(self) -> list[RegisteredEdge]:
        """Every edge ever registered, in registration order."""
        count = int(await self._call(self._contract.functions.edgeCount()))
        edges = []
        for i in range(count):
            key = await self._call(self._contract.functions.edgeKeys(i))
            edge = await self.registered_edge(key)
            if edge is None:
                raise ChainError(f"edge {key} is listed but not registered")
            edges.append(edge)
        return edges

    async def top_up(self, payer: LocalAccount, to: object, wei: int) -> int:
        """Send ``to`` what it lacks of ``wei`` from ``payer``; the amount sent."""
        address = as_address(to, "to")
        w3 = self._w3
        with self._errors():
            balance = int(await w3.eth.get_balance(address))
            if balance >= wei:
                return 0
            amount = wei - balance
            signed = payer.sign_transaction(
                {
                    "to": HexStr(address),
                    "value": amount,
                    "nonce": await w3.eth.get_transaction_count(payer.address, "pending"),
                    "gas": 21_000,
                    "gasPrice": await w3.eth.gas_price,
                    "chainId": self.chain_id,
                }
            )
            tx_hash = await w3.eth.send_raw_transaction(signed.raw_transaction)
            receipt = await w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self._receipt_timeout, poll_latency=0.02
            )
        if receipt["status"] != 1:
            raise ChainError(f"funding {address} failed")
        return amount

    async def opened_challenges(
        self, edge_addr: object, first: int, last: int
    ) -> list[tuple[int, int, bytes]]:
        """``(challenge id, edge sequence number, record hash)`` of every challenge opened
        against the edge in blocks ``first..last``."""
        edge = as_address(edge_addr, "edge")
        with self._errors():
            logs = await self._contract.events.ChallengeOpened.get_logs(
                argument_filters={"edge": edge}, from_block=first, to_block=last
            )
        return [
            (int(e["args"]["challengeId"]), int(e["args"]["seq"]), bytes(e["args"]["recordHash"]))
            for e in logs
        ]
