"""Chain backends: the embedded in-process EVM (eth-tester + py-evm) or any JSON-RPC node.

Both are plain web3 providers so that the client runs one code path. The in-process provider
answers like a JSON-RPC node does: a revert becomes an error response carrying the revert
data (so web3 raises ``ContractCustomError`` exactly as it does for anvil or geth), and it
understands ``evm_increaseTime`` for development chains.
"""

from __future__ import annotations

import ast
import contextlib
import itertools
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from eth.estimators.gas import binary_gas_search_intrinsic_tolerance
from eth.vm.forks.prague import PragueVM
from eth.vm.forks.prague.blocks import PragueBlock
from eth.vm.forks.prague.transactions import PragueLegacyTransaction, PragueTransactionBuilder
from eth.vm.spoof import SpoofTransaction
from eth_abi.abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester.exceptions import TransactionFailed
from eth_typing import Hash32, HexStr
from eth_utils.exceptions import ValidationError
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import ContractCustomError, ContractLogicError, Web3Exception
from web3.providers.async_base import AsyncBaseProvider
from web3.providers.eth_tester import AsyncEthereumTesterProvider
from web3.types import RPCEndpoint, RPCResponse, TxParams, Wei

from secure_ci.exceptions import ChainError, ConfigError, ContractRevertError, LedgerError
from secure_ci.ledger._artifacts import ContractArtifact, decode_revert

__all__ = ["INPROCESS", "InProcessProvider", "make_provider", "send_value", "translate_errors"]

INPROCESS = "inprocess"
"""The backend name of the embedded chain."""

_ERROR_STRING = bytes.fromhex("08c379a0")  # selector of Error(string)
_REVERTED = 3  # the JSON-RPC error code geth and anvil use for execution reverted
_REJECTED = -32000  # geth's code for a transaction it will not accept


def _revert_data(exc: TransactionFailed) -> bytes:
    """eth-tester reports revert data as bytes, as the repr of bytes (eth_call), or as the
    decoded ``Error(string)`` text: turn all three back into the raw revert data."""
    arg: object = exc.args[0] if exc.args else b""
    if isinstance(arg, Exception):
        arg = arg.args[0] if arg.args else str(arg)
    if isinstance(arg, bytes | bytearray):
        return bytes(arg)
    text = str(arg)
    if text[:2] in ("b'", 'b"') and len(text) < 1 << 20:
        with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
            literal = ast.literal_eval(text)
            if isinstance(literal, bytes):
                return literal
    return _ERROR_STRING + abi_encode(["string"], [text])


def _try_gas(state: Any, transaction: Any, gas: int) -> Any:
    snapshot = state.snapshot()
    try:
        return state.apply_transaction(SpoofTransaction(transaction, gas=gas, gas_price=0))
    finally:
        state.revert(snapshot)


def _estimate_gas(state: Any, transaction: Any) -> int:
    """Two EVM runs instead of py-evm's binary search: measure at the block gas limit,
    then confirm the measured gas plus a margin; fall back to the search when it fails."""
    try:
        probe = _try_gas(state, transaction, state.gas_limit)
        if not probe.is_error:
            candidate = min(
                (state.gas_limit - probe.get_gas_remaining()) * 11 // 10, state.gas_limit
            )
            if not _try_gas(state, transaction, candidate).is_error:
                return int(candidate)
    except Exception:  # noqa: S110  (any failure: let the exact search decide)
        pass
    return int(binary_gas_search_intrinsic_tolerance(state, transaction))


class _LegacyTransaction(PragueLegacyTransaction):
    """py-evm's legacy transaction, but it hashes its encoding once and has a short repr.

    An anchoring transaction carries hundreds of KB; py-evm and eth-tester ask one object for
    its hash up to six times per send and receipt, and py-evm formats ``repr(transaction)``
    (the whole calldata) into a debug message for every transaction, logging on or off.
    Both were ~20 % of the in-process cost of an anchor; execution is unchanged.
    """

    @property
    def hash(self) -> Hash32:
        cached: Hash32 | None = self.__dict__.get("_secure_ci_hash")
        if cached is None:
            cached = self.__dict__["_secure_ci_hash"] = super().hash
        return cached

    def __repr__(self) -> str:
        return f"<{type(self).__name__} nonce={self.nonce} data={len(self.data)} bytes>"


class _TransactionBuilder(PragueTransactionBuilder):
    legacy_signed = _LegacyTransaction


class _Block(PragueBlock):
    transaction_builder = _TransactionBuilder


_PragueVM = PragueVM.configure(__name__="InProcessPragueVM", block_class=_Block)


class InProcessProvider(AsyncEthereumTesterProvider):
    """eth-tester (py-evm, Prague) behind the JSON-RPC error conventions of a real node."""

    def __init__(self) -> None:
        super().__init__()
        self.ethereum_tester = EthereumTester(PyEVMBackend(vm_configuration=((0, _PragueVM),)))
        self._ids = itertools.count()
        self.ethereum_tester.backend.chain.gas_estimator = _estimate_gas

    def _response(self, result: Any = None, error: dict[str, Any] | None = None) -> RPCResponse:
        response: dict[str, Any] = {"jsonrpc": "2.0", "id": next(self._ids)}
        if error is None:
            response["result"] = result
        else:
            response["error"] = error
        return response  # type: ignore[return-value]

    def _increase_time(self, params: Any) -> RPCResponse:
        seconds = int(params[0], 16) if isinstance(params[0], str) else int(params[0])
        tester = self.ethereum_tester
        now = int(tester.get_block_by_number("pending")["timestamp"])
        tester.time_travel(now + max(seconds, 0))
        return self._response(seconds)

    async def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        if method == "evm_increaseTime":
            return self._increase_time(params)
        namespace, _, endpoint = method.partition("_")
        delegator = self.api_endpoints.get(namespace, {}).get(endpoint)
        if delegator is None:
            return self._response(error={"code": -32601, "message": f"unknown method {method}"})
        try:
            result = delegator(self.ethereum_tester, params)
        except NotImplementedError:
            return self._response(error={"code": -32601, "message": f"not implemented {method}"})
        except TransactionFailed as exc:
            data = "0x" + _revert_data(exc).hex()
            error = {"code": _REVERTED, "message": "execution reverted", "data": data}
            return self._response(error=error)
        except ValidationError as exc:  # a node rejects such transactions (funds, nonce, gas)
            return self._response(error={"code": _REJECTED, "message": str(exc)[:1000]})
        return self._response(result)


def make_provider(backend: str, *, timeout: float = 30.0) -> AsyncBaseProvider:
    """A provider for ``"inprocess"`` or an ``http(s)://`` JSON-RPC URL."""
    if backend == INPROCESS:
        return InProcessProvider()
    parts = urlsplit(backend)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"ledger backend must be {INPROCESS!r} or an http(s) URL, not {backend!r}"
        )
    return AsyncHTTPProvider(backend, request_kwargs={"timeout": timeout})


def _hexdata(data: object) -> bytes | None:
    if isinstance(data, str) and data.startswith("0x"):
        with contextlib.suppress(ValueError):
            return bytes.fromhex(data[2:])
    return None


@contextlib.contextmanager
def translate_errors(artifact: ContractArtifact) -> Iterator[None]:
    """Reverts become ContractRevertError (custom error name), the rest ChainError."""
    try:
        yield
    except ContractLogicError as exc:
        data = _hexdata(exc.data)
        if data:
            reason = decode_revert(artifact, data)
        elif isinstance(exc, ContractCustomError):
            reason = str(exc)
        else:
            reason = str(exc.message or exc)
        raise ContractRevertError(reason) from exc
    except LedgerError:
        raise
    except (Web3Exception, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise ChainError(f"{type(exc).__name__}: {exc}") from exc


async def send_value(
    w3: AsyncWeb3[Any], fallback: LocalAccount, to: str, wei: int, receipt_timeout: float
) -> None:
    """Send ether from the node's first (unlocked) account, or signed by ``fallback``."""
    accounts: list[str] = list(await w3.eth.accounts)
    tx: TxParams = {"to": to, "value": Wei(wei)}
    if accounts:
        tx_hash = await w3.eth.send_transaction({**tx, "from": accounts[0]})
    else:
        nonce = await w3.eth.get_transaction_count(fallback.address, "pending")
        signed = fallback.sign_transaction(
            {
                "to": HexStr(to),
                "value": wei,
                "nonce": nonce,
                "gas": 21_000,
                "gasPrice": await w3.eth.gas_price,
                "chainId": await w3.eth.chain_id,
            }
        )
        tx_hash = await w3.eth.send_raw_transaction(signed.raw_transaction)
    await w3.eth.wait_for_transaction_receipt(tx_hash, timeout=receipt_timeout, poll_latency=0.02)
