"""Kernel link shaping: a namespace of its own, tc tbf on its loopback, counters parsed.

The shaping is checked by the kernel's own counters (the bucket held packets back), never
by a clock.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secure_ci.exceptions import ConfigError
from secure_ci.testing._netns import (
    KernelShaper,
    in_namespace,
    namespace_unavailable,
    parse_tbf_stats,
)

_TC = (
    '[{"kind":"tbf","handle":"8002:","root":true,"refcnt":2,"options":{"rate":1000000,'
    '"burst":16384,"lat":200000},"bytes":5,"packets":1,"drops":0,"overlimits":3,'
    '"requeues":0,"backlog":0,"qlen":0}]'
)

needs_netns = pytest.mark.skipif(
    namespace_unavailable() is not None, reason=f"no netns here: {namespace_unavailable()}"
)

_CHILD = textwrap.dedent(
    """
    import asyncio, json
    from secure_ci.testing import Link, open_link_shaper
    from secure_ci.testing._netns import KernelShaper

    async def main():
        got = bytearray()
        async def serve(reader, writer):
            while chunk := await reader.read(65536):
                got.extend(chunk)
            writer.close()
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with open_link_shaper(port) as inner:
            link = KernelShaper(inner)
            link.shape(uplink=Link.mbps(8.0, delay_ms=1.0), downlink=Link.mbps(8.0))
            host, port = link.address.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(bytes(1 << 20))
            await writer.drain()
            writer.close()
            await writer.wait_closed()
            while len(got) < 1 << 20:
                await asyncio.sleep(0.01)
            stats = link.stats()
            link.shape(uplink=Link(None, 1.0))
            after = link.stats()
        server.close()
        print(json.dumps({"received": len(got), "rate": stats.rate_bps,
                          "bytes": stats.bytes, "overlimits": stats.overlimits,
                          "after": after is None}))

    asyncio.run(main())
    """
)


@needs_netns
def test_the_kernel_bucket_shapes_a_transfer_in_its_own_namespace() -> None:
    argv, env = in_namespace([sys.executable, "-c", _CHILD])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["received"] == 1 << 20
    assert report["rate"] == 8_000_000
    assert report["bytes"] >= 2 << 20  # both hops of the proxy cross the loopback
    assert report["overlimits"] > 0  # the bucket held packets back: it shaped the transfer
    assert report["after"] is True  # no rate: no bucket


def test_outside_its_namespace_it_refuses_to_shape_the_host() -> None:
    with pytest.raises(ConfigError, match="own network namespace"):
        KernelShaper(None)  # type: ignore[arg-type]


def test_tc_counters_are_parsed() -> None:
    stats = parse_tbf_stats(_TC)
    assert stats is not None
    assert (stats.rate_bps, stats.burst_bytes, stats.bytes, stats.overlimits) == (
        8_000_000,
        16384,
        5,
        3,
    )
    assert parse_tbf_stats('[{"kind":"noqueue","root":true}]') is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{}",
        "[1]",
        '[{"kind":"tbf","root":true}]',
        '[{"kind":"tbf","root":true,"options":{"rate":-1,"burst":1},"bytes":0,"packets":0,'
        '"drops":0,"overlimits":0}]',
        _TC.replace('"bytes":5', '"bytes":true'),
        "[" * 100_000,
        " " * 70_000,
    ],
)
def test_malformed_tc_output_is_a_clear_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_tbf_stats(text)


@given(st.binary(max_size=len(_TC)))
def test_mutated_tc_output_never_crashes(flips: bytes) -> None:
    raw = bytes(x ^ y for x, y in zip(flips, _TC.encode(), strict=False))
    text = raw.decode("utf-8", "replace") + _TC[len(flips) :]
    with contextlib.suppress(ConfigError):  # a clear error, or a parse: nothing else
        parse_tbf_stats(text)
