"""LedgerClient boundaries: backend selection, error translation, argument validation."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from eth_abi.abi import encode
from eth_account import Account
from eth_tester.exceptions import TransactionFailed
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.exceptions import ChainError, ConfigError, LedgerError, RecordError
from secure_ci.ledger import LedgerClient, open_ledger
from secure_ci.ledger._backends import _revert_data, make_provider
from secure_ci.ledger._chain import as_address, as_bytes32, as_proof, as_task_result, as_uint
from secure_ci.ledger._records import TaskResult

ZERO = bytes(32)
RESULT = TaskResult(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, b"\x04" * 32, b"\x05" * 32, 1, 2, 3)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def ledger() -> AsyncIterator[LedgerClient]:
    async with open_ledger() as client:
        yield client


@pytest.mark.parametrize("backend", ["", "ws://127.0.0.1:1", "http://", "file:///etc/passwd"])
def test_backend_names_are_validated(backend: str) -> None:
    with pytest.raises(ConfigError):
        make_provider(backend)


async def test_unreachable_node_is_a_chain_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        with pytest.raises(ChainError):
            async with open_ledger(f"http://127.0.0.1:{port}"):
                pass


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n{{{{{",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]",
    ],
)
async def test_hostile_node_is_a_chain_error(reply: bytes) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(ChainError):
            async with open_ledger(f"http://127.0.0.1:{port}"):
                pass


async def test_inprocess_deploys_with_a_given_key() -> None:
    owner = Account.from_key(b"\x07" * 32)
    async with open_ledger(deployer=owner, challenge_window=60) as ledger:
        assert await ledger.contract_owner() == owner.address
        assert await ledger.challenge_window() == 60
        assert ledger.owner is owner


async def test_inprocess_cannot_bind_an_address() -> None:
    with pytest.raises(LedgerError):
        async with open_ledger(contract_address="0x" + "11" * 20):
            pass


@pytest.mark.asyncio(loop_scope="module")
async def test_identity_and_domain(ledger: LedgerClient) -> None:
    assert ledger.domain.chain_id == ledger.chain_id
    assert "0x" + ledger.domain.contract.hex() == ledger.address.lower()
    assert await ledger.block_number() > 0
    before = await ledger.timestamp()
    await ledger.advance_time(1000)
    assert await ledger.timestamp() >= before + 1000


@pytest.mark.asyncio(loop_scope="module")
async def test_fund_moves_value(ledger: LedgerClient) -> None:
    target = Account.create()
    await ledger.fund(target.address, 12345)
    await ledger.fund(bytes.fromhex(target.address[2:]), 5)
    assert not await ledger.is_registered_device(target)


@pytest.mark.asyncio(loop_scope="module")
async def test_bad_arguments_never_reach_the_chain(ledger: LedgerClient) -> None:
    edge = Account.create()
    with pytest.raises(RecordError):
        await ledger.anchor_batch(edge, 0, b"short", 0, 1, ZERO, b"")
    with pytest.raises(RecordError):
        await ledger.anchor_batch(edge, -1, ZERO, 0, 1, ZERO, b"")
    with pytest.raises(RecordError):
        await ledger.anchor_batch(edge, 0, ZERO, 0, 1 << 32, ZERO, b"")
    with pytest.raises(RecordError):
        await ledger.verify_task(edge.address, 0, 0, ZERO, [ZERO] * 65)
    with pytest.raises(RecordError):
        await ledger.edge_state("not an address")
    with pytest.raises(RecordError):
        await ledger.challenge(edge, {"taskId": ZERO}, b"")


def test_revert_data_from_eth_tester_shapes() -> None:
    raw = b"\xaf\xd2\xf8\x3a" + bytes(64)
    assert _revert_data(TransactionFailed(raw)) == raw
    assert _revert_data(TransactionFailed(repr(raw))) == raw
    assert _revert_data(TransactionFailed(Exception(raw))) == raw
    text = _revert_data(TransactionFailed("plain reason"))
    assert text == bytes.fromhex("08c379a0") + encode(["string"], ["plain reason"])


@given(st.text(max_size=60) | st.binary(max_size=60))
def test_revert_data_never_raises(arg: str | bytes) -> None:
    assert isinstance(_revert_data(TransactionFailed(arg)), bytes)
    assert isinstance(_revert_data(TransactionFailed("b" + repr(arg))), bytes)


def test_task_result_shapes() -> None:
    expected = tuple(getattr(RESULT, k) for k in RESULT.__slots__)
    assert as_task_result(RESULT) == expected
    assert as_task_result(list(expected)) == expected
    camel = dict(
        zip(
            [
                "taskId",
                "requestHash",
                "outputCommitment",
                "measurement",
                "quoteId",
                "status",
                "latencyMs",
                "edgeSeq",
            ],
            expected,
            strict=True,
        )
    )
    assert as_task_result(camel) == expected
    for bad in [expected[:-1], (*expected[:5], 256, 2, 3), (*expected[:7], -1), object(), {}]:
        with pytest.raises(RecordError):
            as_task_result(bad)


@given(st.one_of(st.none(), st.integers(), st.text(max_size=50), st.binary(max_size=40)))
def test_validators_reject_or_accept_cleanly(value: object) -> None:
    for check in (
        lambda v: as_address(v),
        lambda v: as_bytes32(v, "x"),
        lambda v: as_uint(v, "x", 64),
        lambda v: as_proof([v]),
        lambda v: as_task_result([v] * 8),
    ):
        with contextlib.suppress(RecordError):
            check(value)


def test_address_forms_agree() -> None:
    account = Account.create()
    raw = bytes.fromhex(account.address[2:])
    assert as_address(account) == as_address(raw) == as_address(account.address.lower())
    with pytest.raises(RecordError):
        as_address(raw[:19])
    with pytest.raises(RecordError):
        as_uint(True, "flag", 8)
