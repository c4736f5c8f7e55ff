"""SigningPool: signatures identical to Signer.sign, in order, inline and in worker processes;
the worker's frame parser refuses malformed input with LedgerError."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import signal
import struct
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from eth_account import Account
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_ci.exceptions import LedgerError, RecordError, SignatureError
from secure_ci.ledger import open_ledger
from secure_ci.ledger._anchor import Anchorer
from secure_ci.ledger._journal import Journal
from secure_ci.ledger._records import Signer, keccak256, recover_signer
from secure_ci.ledger._signing import MAX_DIGESTS, SigningPool, serve
from secure_ci.testing import sample_tasks

KEY = keccak256(b"signing-pool-test-key")
SIGNER = Signer(KEY)
DIGESTS = [keccak256(i.to_bytes(4, "big")) for i in range(600)]


@pytest.fixture(scope="module")
def pool() -> Iterator[SigningPool]:
    with SigningPool(KEY, workers=2) as p:
        p.start()
        yield p


def _frame(digests: list[bytes]) -> bytes:
    return struct.pack(">I", len(digests)) + b"".join(digests)


def _serve(data: bytes) -> bytes:
    out = io.BytesIO()
    serve(io.BytesIO(data), out)
    return out.getvalue()


def test_worker_signatures_match_the_signer_in_order(pool: SigningPool) -> None:
    futures = [pool.submit(DIGESTS[i : i + 100]) for i in range(0, len(DIGESTS), 100)]
    signatures = [s for f in futures for s in f.result(timeout=30)]
    assert signatures == [SIGNER.sign(d) for d in DIGESTS]
    assert recover_signer(signatures[7], DIGESTS[7]) == SIGNER.address == pool.address
    assert pool.pending == 0
    assert pool.cpu_seconds > 0


def test_async_sign_and_empty_calls(pool: SigningPool) -> None:
    async def main() -> list[list[bytes]]:
        return list(await asyncio.gather(pool.sign(DIGESTS[:3]), pool.sign([])))

    assert asyncio.run(main()) == [[SIGNER.sign(d) for d in DIGESTS[:3]], []]


def test_inline_pool_has_the_same_interface() -> None:
    with SigningPool(KEY, workers=0) as inline:
        future = inline.submit(DIGESTS[:5])
        assert future.done()
        assert future.result() == [SIGNER.sign(d) for d in DIGESTS[:5]]
        assert inline.cpu_seconds == 0  # the caller's own CPU time
    with pytest.raises(LedgerError, match="closed"):
        inline.submit(DIGESTS[:1])


@pytest.mark.parametrize(
    "digests",
    [
        [b"\x00" * 31],
        [b"\x00" * 33],
        ["00" * 32],
        [bytearray(32)],
        [DIGESTS[0]] * (MAX_DIGESTS + 1),
    ],
)
def test_malformed_digests_are_refused_before_sending(
    pool: SigningPool, digests: list[bytes]
) -> None:
    with pytest.raises(RecordError):
        pool.submit(digests)
    assert pool.pending == 0


def test_a_worker_that_cannot_start_is_a_ledger_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(LedgerError, match="cannot start"):
        SigningPool(KEY, workers=2)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(LedgerError):
        SigningPool(KEY, workers=-1)
    with pytest.raises(SignatureError):
        SigningPool(b"\x00" * 32, workers=0)


def test_a_dead_worker_fails_its_calls_with_ledger_error() -> None:
    pool = SigningPool(KEY, workers=1)
    try:
        pool.start()
        (worker,) = pool._workers
        os.kill(worker.process.pid, signal.SIGSTOP)  # the request waits in the pipe
        future = pool.submit(DIGESTS[:10])
        worker.process.kill()
        worker.process.wait(timeout=10)
        with pytest.raises(LedgerError, match="exited"):
            future.result(timeout=30)
        worker._reader.join(timeout=10)
        with pytest.raises(LedgerError, match="gone"):
            pool.submit(DIGESTS[:1])
        assert pool.pending == 0
    finally:
        pool.close()
    pool.close()  # idempotent


def test_many_large_calls_in_flight_do_not_deadlock() -> None:
    """Frames and replies far beyond the pipe buffers, all in flight at once."""
    many = [keccak256(i.to_bytes(4, "big")) for i in range(2000)]
    with SigningPool(KEY, workers=1) as pool:
        futures = [pool.submit(many) for _ in range(20)]
        done, not_done = concurrent.futures.wait(futures, timeout=120)
        assert not not_done
        assert all(f.result() == futures[0].result() for f in done)
        assert futures[0].result()[7] == Signer(KEY).sign(many[7])


def test_closing_with_a_hung_worker_ends() -> None:
    pool = SigningPool(KEY, workers=1)
    pool.start()
    (worker,) = pool._workers
    os.kill(worker.process.pid, signal.SIGSTOP)  # hung: reads and answers nothing
    future = pool.submit(DIGESTS[:10])
    pool.close(grace_seconds=0.5)  # kills it after its grace period
    with pytest.raises(LedgerError):
        future.result(timeout=30)


def test_serve_answers_frames_in_order() -> None:
    data = KEY + _frame(DIGESTS[:2]) + _frame([]) + _frame(DIGESTS[2:3])
    out = _serve(data)
    sigs = b"".join(SIGNER.sign(d) for d in DIGESTS[:3])
    # replies: 2 signatures + cpu, no signature + cpu, 1 signature + cpu
    assert out[:130] == sigs[:130]
    assert out[146:211] == sigs[130:]
    assert len(out) == 3 * 65 + 3 * 8
    assert _serve(b"") == b""  # no key: nothing to do


@pytest.mark.parametrize(
    "data",
    [
        KEY[:10],  # truncated key
        KEY + b"\x00\x00",  # truncated count
        KEY + _frame(DIGESTS[:2])[:-1],  # truncated digests
        KEY + struct.pack(">I", MAX_DIGESTS + 1),  # oversized request
    ],
)
def test_serve_refuses_malformed_frames(data: bytes) -> None:
    with pytest.raises(LedgerError):
        _serve(data)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), max_size=8))
def test_serve_signs_any_digests(digests: list[bytes]) -> None:
    out = _serve(KEY + _frame(digests))
    assert out[: 65 * len(digests)] == b"".join(SIGNER.sign(d) for d in digests)
    assert len(out) == 65 * len(digests) + 8


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 150), st.integers(0, 255))
def test_serve_mutated_frames_fail_only_with_ledger_error(
    tail: bytes, position: int, value: int
) -> None:
    data = bytearray(KEY + _frame(DIGESTS[:2]) + tail)
    if position < len(data) - 32:
        data[32 + position] = value  # never the key: a bad key is the caller's error
    try:
        out = _serve(bytes(data))
    except LedgerError:
        return
    assert len(out) >= 2 * 65 + 8 or data[32:36] != KEY[:0] + struct.pack(">I", 2)


async def test_pool_signed_records_anchor_on_the_in_process_chain(
    pool: SigningPool, tmp_path: Path
) -> None:
    edge = Account.from_key(KEY)
    async with open_ledger("inprocess") as ledger:
        admin = Account.create()
        await ledger.fund(admin.address, 10**21)
        await ledger.fund(edge.address, 10**21)
        party = await ledger.register_party(admin.address)
        await ledger.allow_measurement(b"\x11" * 32)
        await ledger.register_edge(admin, party, edge, b"\x11" * 32, b"\x22" * 32, "t:1")
        inline = sample_tasks(30, edge_key=KEY, domain=ledger.domain)
        signatures = await pool.sign([e.record_hash for e in inline])
        entries = [replace(e, edge_sig=s) for e, s in zip(inline, signatures, strict=True)]
        assert entries == inline  # RFC 6979: the worker signs exactly as the caller would
        with Journal.open(tmp_path / "edge.db", edge=SIGNER.address) as journal:
            journal.append_many(entries)
            receipts = await Anchorer(journal, ledger, edge, max_records=20).flush()
            state = await ledger.edge_state(edge.address)
            assert (len(receipts), state.next_seq, state.head) == (2, 30, journal.head)
