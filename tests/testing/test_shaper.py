"""The link shaper: rate, delay, run-time changes, cuts, and a real attested session through it.

Timing is only ever compared with what the shaper was configured to do (a measured rate over
the configured rate, an added RTT over the configured delays), with generous bounds, over
transfers of bounded size; timeouts are hang guards, never the thing asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import torch

from secure_ci.device import DeviceIdentity, open_session
from secure_ci.edge import EdgeConfig, EdgeLimits, ModelRegistry, open_edge
from secure_ci.edge._models import load_zoo_tails
from secure_ci.exceptions import ChannelError, ConfigError, SecureCIError
from secure_ci.partition import Partitioner, PartitionPlan
from secure_ci.testing import (
    DEV_NOW,
    Link,
    LinkShaper,
    dev_enclave,
    open_link_shaper,
    shaper_thread,
)
from secure_ci.zoo import get

GUARD = 20.0  # seconds: a hang guard, never a measured bound
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Count bytes until EOF, answer the count (8 bytes)."""
    total = 0
    while data := await reader.read(65536):
        total += len(data)
    writer.write(total.to_bytes(8, "big"))
    await writer.drain()
    writer.close()


async def _source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read an 8-byte count, send that many bytes, close."""
    n = int.from_bytes(await reader.readexactly(8), "big")
    writer.write(bytes(n))
    await writer.drain()
    writer.close()


async def _server(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async for port in _server(_echo):
        yield port


async def _upload_rate(port: int, nbytes: int) -> float:
    """Bits per second from the first byte written to the sink's count coming back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    writer.write(bytes(nbytes))
    writer.write_eof()
    count = int.from_bytes(await reader.readexactly(8), "big")
    elapsed = time.perf_counter() - start
    writer.close()
    assert count == nbytes
    return nbytes * 8 / elapsed


async def _download_rate(port: int, nbytes: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    writer.write(nbytes.to_bytes(8, "big"))
    received = 0
    while data := await reader.read(65536):
        received += len(data)
    elapsed = time.perf_counter() - start
    writer.close()
    assert received == nbytes
    return nbytes * 8 / elapsed


async def _rtt(port: int, rounds: int = 5) -> float:
    """Median round trip (s) of a 32-byte message through an echo server."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        writer.write(b"x" * 32)
        await reader.readexactly(32)
        times.append(time.perf_counter() - start)
    writer.close()
    return statistics.median(times)


def _within(ratio: float, nbytes: int, burst: int = 16384) -> bool:
    """A measured/configured rate is sane: not far below, never above what the bucket allows
    (its first burst is free, so a transfer of ``nbytes`` may beat the rate by that much)."""
    return 0.4 < ratio < 1.1 * nbytes / (nbytes - burst)


async def _is_reset(reader: asyncio.StreamReader) -> bool:
    """True when the connection ends (EOF or reset) rather than carrying data."""
    try:
        async with asyncio.timeout(GUARD):
            return await reader.read(1) == b""
    except ConnectionError:
        return True


@pytest.mark.parametrize("mbit", [4.0, 16.0])
async def test_upload_rate_matches_the_configured_rate(mbit: float) -> None:
    async for port in _server(_sink):
        async with open_link_shaper(port, uplink=Link.mbps(mbit)) as link:
            nbytes = int(mbit * 1e6 / 8 * 0.5)  # half a second's worth
            async with asyncio.timeout(GUARD):
                ratio = await _upload_rate(link.port, nbytes) / (mbit * 1e6)
            assert link.stats().bytes_up == nbytes
    assert _within(ratio, nbytes)


async def test_download_rate_matches_the_configured_rate() -> None:
    mbit = 8.0
    async for port in _server(_source):
        async with open_link_shaper(port, downlink=Link.mbps(mbit)) as link:
            nbytes = 500_000
            async with asyncio.timeout(GUARD):
                ratio = await _download_rate(link.port, nbytes) / (mbit * 1e6)
            assert link.stats().bytes_down == nbytes
    assert _within(ratio, nbytes)


async def test_delay_adds_its_round_trip(echo_port: int) -> None:
    up, down = 15.0, 25.0
    async with asyncio.timeout(GUARD):
        async with open_link_shaper(echo_port) as plain:
            base = await _rtt(plain.port)
        async with open_link_shaper(
            echo_port, uplink=Link(delay_ms=up), downlink=Link(delay_ms=down)
        ) as link:
            shaped = await _rtt(link.port)
    added = (shaped - base) / ((up + down) / 1e3)
    assert 0.9 < added < 3.0


async def test_rate_change_takes_effect(echo_port: int) -> None:
    async for port in _server(_sink):
        async with open_link_shaper(port, uplink=Link.mbps(2.0)) as link:
            async with asyncio.timeout(GUARD):
                slow = await _upload_rate(link.port, 200_000)
                link.shape(uplink=Link.mbps(16.0))
                assert link.uplink.rate_bps == 16e6
                fast = await _upload_rate(link.port, 800_000)
    assert _within(slow / 2e6, 200_000)
    assert _within(fast / 16e6, 800_000)
    assert fast / slow > 3  # 8x configured


async def test_a_chunk_waiting_for_tokens_sees_a_rate_change() -> None:
    async for port in _server(_sink):
        # 64 KiB at 8 kbit/s would take a minute: lifting the limit lets it through at once
        async with open_link_shaper(port, uplink=Link(rate_bps=8000.0, burst_bytes=1024)) as link:
            transfer = asyncio.create_task(_upload_rate(link.port, 65536))
            await asyncio.sleep(0.2)
            assert not transfer.done()
            link.shape(uplink=Link())
            async with asyncio.timeout(GUARD):
                await transfer


async def test_cut_drops_established_connections_and_refuses_new_ones(echo_port: int) -> None:
    async with open_link_shaper(echo_port) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        link.cut()
        assert link.is_cut
        assert await _is_reset(reader)
        writer.close()
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", link.port)
        assert await _is_reset(reader2)  # accepted, then reset: never relayed
        writer2.close()
        link.restore()
        async with asyncio.timeout(GUARD):
            assert await _rtt(link.port, rounds=1) > 0
        stats = link.stats()
    assert stats.dropped == 1
    assert stats.refused == 1
    assert stats.connections == 3


async def test_blackhole_holds_new_connections_silent(echo_port: int) -> None:
    async with open_link_shaper(echo_port) as link:
        link.cut("blackhole")
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        writer.write(b"ping")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await reader.read(1)
        link.restore()
    assert await _is_reset(reader)  # closing the shaper resets what it held
    writer.close()


async def test_a_frozen_link_delivers_after_restore(echo_port: int) -> None:
    async with open_link_shaper(echo_port, uplink=Link(delay_ms=1.0)) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        link.cut("blackhole", drop=False)
        writer.write(b"ping")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await reader.read(1)
        link.restore()
        async with asyncio.timeout(GUARD):
            assert await reader.readexactly(4) == b"ping"
        writer.close()


async def test_jitter_is_seeded_and_bounded(echo_port: int) -> None:
    with pytest.raises(ConfigError, match="seed"):
        async with open_link_shaper(echo_port, jitter=0.2):
            pass
    async with open_link_shaper(echo_port, uplink=Link(delay_ms=10.0), jitter=0.2, seed=1) as link:
        async with asyncio.timeout(GUARD):
            assert await _rtt(link.port, rounds=3) > 0.008  # never below (1 - jitter) x delay


@pytest.mark.parametrize(
    "bad",
    [
        {"rate_bps": 0.0},
        {"rate_bps": float("inf")},
        {"delay_ms": -1.0},
        {"burst_bytes": 100},
        {"burst_bytes": 2.5},
    ],
)
def test_bad_links_are_config_errors(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        Link(**bad)  # type: ignore[arg-type]


def test_threaded_shaper_serves_sync_code() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with shaper_thread(port, downlink=Link(delay_ms=5.0)) as link:
            with socket.create_connection(("127.0.0.1", link.port), timeout=GUARD) as client:
                peer, _ = server.accept()
                with peer:
                    client.sendall(b"hello")
                    assert peer.recv(5) == b"hello"
                    peer.sendall(b"world")
                    assert client.recv(5) == b"world"
                    link.cut()
                    client.settimeout(GUARD)
                    with contextlib.suppress(ConnectionResetError):
                        assert client.recv(1) == b""
            assert link.stats().dropped == 1
            link.restore()
            assert not link.call(lambda s: s.is_cut)


# -- a real attested session through the shaper ----------------------------------------------

CUT = 2


async def test_an_attested_session_is_relayed_end_to_end() -> None:
    entry = get("digits_cnn")
    torch.manual_seed(0)  # the weights load_zoo_tails(seed=0) gives the edge
    partitioner = Partitioner(entry.build(), (torch.zeros(entry.input_shape),))
    enclave = dev_enclave(DEV_NOW)
    identity = DeviceIdentity.generate()
    models = ModelRegistry()
    for tail in load_zoo_tails("digits_cnn", [CUT], ("int8",), seed=0):
        models.add(tail)
    config = EdgeConfig(
        limits=EdgeLimits(max_wait_ms=1.0), allowed_devices=frozenset({identity.address})
    )
    xs = [torch.randn(1, *entry.input_shape[1:], generator=torch.Generator().manual_seed(i))
          for i in range(3)]  # fmt: skip

    def session(link: LinkShaper) -> object:
        return open_session(
            link.address,
            policy=enclave.policy,
            collateral=enclave.collateral,
            identity=identity,
            model=partitioner.model,
            plan=PartitionPlan(partitioner.model_id, CUT, "int8"),
            example_input=partitioner.example_inputs[0],
            clock=lambda: float(DEV_NOW),
            timeout=GUARD,
        )

    async with (
        open_edge(
            config, provider=enclave.provider, models=models, clock=lambda: float(DEV_NOW)
        ) as edge,
        open_link_shaper(
            edge.port,
            uplink=Link.mbps(20.0, delay_ms=2.0),
            downlink=Link.mbps(50.0, delay_ms=2.0),
        ) as link,
    ):
        async with session(link) as s:  # type: ignore[attr-defined]
            for x in xs:
                y = await s.infer(x)
                with torch.no_grad():
                    expected = partitioner.model(x)
                torch.testing.assert_close(y, expected, atol=0.05, rtol=0)
            assert len(s.receipts) == 3
            stats = link.stats()
            assert stats.bytes_up > s.bytes_sent  # TLS records around the frames
            assert stats.bytes_down > 0
            link.cut()
            with pytest.raises((SecureCIError, ChannelError)):
                async with asyncio.timeout(GUARD):
                    await s.infer(xs[0])
        link.restore()
        async with session(link) as s:  # type: ignore[attr-defined]
            y = await s.infer(xs[1])
            assert y.shape == (1, 10)


# -- a target that ends the connection (a crashed edge) ---------------------------------------

HOUR_MS = 3.6e6  # a delay no test waits for: whatever arrives came without it


def _reset_after_one_byte(got: asyncio.Event) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST, as a killed process with unread data would send
        got.set()

    return handler


async def _say_bye_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(1)
    writer.write(b"bye")
    await writer.drain()
    writer.close()  # FIN after the data, as a killed process with nothing unread sends


async def test_a_target_reset_resets_the_device_side_without_the_downlink_delay() -> None:
    got = asyncio.Event()
    async for port in _server(_reset_after_one_byte(got)):
        async with open_link_shaper(port, downlink=Link(delay_ms=HOUR_MS)) as link:
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            writer.write(b"x")
            assert await _is_reset(reader)  # within the guard: not an hour later
            writer.close()
            closes = link.closes()
    assert got.is_set()
    assert len(closes) == 1
    (close,) = closes
    assert close.how == "reset"
    assert close.device_at is not None
    assert close.device_at >= close.target_at


async def test_a_target_close_comes_right_behind_its_delayed_data() -> None:
    delay_ms = 50.0
    async for port in _server(_say_bye_and_close):
        async with open_link_shaper(
            port, uplink=Link(delay_ms=0.0), downlink=Link(delay_ms=delay_ms)
        ) as link:
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            writer.write(b"x")
            async with asyncio.timeout(GUARD):
                assert await reader.read() == b"bye"  # the data, then EOF
            closes = link.closes()
            writer.close()
    (close,) = closes
    assert close.how == "eof"
    assert close.device_at is not None
    assert close.device_at >= close.target_at  # after the data (read above), never before


async def test_a_target_close_is_not_held_by_data_stuck_in_the_other_direction() -> None:
    close_now = asyncio.Event()

    async def close_when_told(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        writer.write(b"hi")
        await close_now.wait()
        writer.close()

    async for port in _server(close_when_told):
        async with open_link_shaper(port) as link:
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            writer.write(b"x")
            async with asyncio.timeout(GUARD):
                assert await reader.readexactly(2) == b"hi"
            link.shape(uplink=Link(delay_ms=HOUR_MS))  # the device's next bytes: an hour out
            writer.write(b"more")
            close_now.set()
            async with asyncio.timeout(GUARD):
                assert await reader.read() == b""  # the target's close still comes through
            writer.close()
            (close,) = link.closes()
    assert close.how == "eof"
    assert close.device_at is not None


async def test_a_target_close_with_nothing_queued_is_not_delayed() -> None:
    async def close_after_one_byte(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readexactly(1)
        writer.close()

    async for port in _server(close_after_one_byte):
        async with open_link_shaper(port, downlink=Link(delay_ms=HOUR_MS)) as link:
            reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
            writer.write(b"x")
            async with asyncio.timeout(GUARD):  # within the guard: not an hour later
                assert await reader.read() == b""
            writer.close()
            (close,) = link.closes()
    assert close.how == "eof"
    assert close.device_at is not None
