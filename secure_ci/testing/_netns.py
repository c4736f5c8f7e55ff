"""Kernel link shaping in a private network namespace: ``tc tbf`` on its loopback.

The user-space shaper (:mod:`secure_ci.testing._shaper`) emulates a link inside the process.
Where the machine allows it, a benchmark can let the kernel shape the link instead: it runs
itself again under ``unshare -rn`` (a user and network namespace of its own: only a loopback,
no privilege on the host) and puts a token-bucket filter on that loopback with ``tc``. Two
facts of this machine shape the design (see the issue text): ``netem`` is missing, so delay
stays with the user-space shaper (:class:`KernelShaper` combines the two), and loopback's
64 KiB MTU stalls ``tbf``, so the namespace's loopback comes up with an MTU of 1500. Loopback
is one device for both directions: the rate applies to the sum of both, which is what a
half-duplex radio link does too.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from secure_ci.exceptions import ConfigError
from secure_ci.testing._shaper import Link, LinkShaper

__all__ = [
    "KernelShaper",
    "TbfStats",
    "in_namespace",
    "inside_namespace",
    "namespace_unavailable",
    "parse_tbf_stats",
]

ENV = "SECURE_CI_NETNS"
MTU = 1500
LATENCY_MS = 200  # how long a packet may wait in the bucket before tbf drops it
_UNSHARE = ("unshare", "--user", "--map-root-user", "--net")
_SETUP = f'ip link set lo up mtu {MTU} && exec "$@"'
_MAX_TC_OUTPUT = 1 << 16

Run = Callable[..., "subprocess.CompletedProcess[str]"]


def inside_namespace() -> bool:
    """Whether this process runs in a namespace made by :func:`in_namespace`: the marker
    in the environment *and* a network namespace other than the host's (init's), so an
    inherited marker never lets it shape the host's loopback."""
    if os.environ.get(ENV) != "1":
        return False
    try:
        return os.readlink("/proc/self/ns/net") != os.readlink("/proc/1/ns/net")
    except OSError:  # init's namespace is not ours to read: a user namespace of our own
        return True


def in_namespace(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``argv`` in a new user and network
    namespace, its loopback up with an MTU of 1500 (ConfigError when that is impossible)."""
    reason = namespace_unavailable()
    if reason is not None:
        raise ConfigError(f"kernel link shaping is not available here: {reason}")
    return [*_UNSHARE, "sh", "-c", _SETUP, "sh", *argv], {**os.environ, ENV: "1"}


@functools.cache
def namespace_unavailable() -> str | None:
    """None when ``unshare -rn`` and ``tc tbf`` work here, else why not."""
    for tool in ("unshare", "ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"ip link set lo up mtu {MTU} && tc qdisc replace dev lo root tbf rate 1mbit burst 16kb latency 50ms"  # noqa: E501
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv
            [*_UNSHARE, "sh", "-c", probe], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if done.returncode != 0:
        return f"unshare -rn with tc tbf failed: {(done.stderr or done.stdout).strip()[:200]}"
    return None


@dataclass(frozen=True)
class TbfStats:
    """The loopback's token bucket as ``tc -s -j qdisc show`` reports it."""

    rate_bps: int
    burst_bytes: int
    bytes: int
    packets: int
    drops: int
    overlimits: int


def _count(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise ConfigError(f"tc reported a bad {key!r}: {value!r}")
    return value


def parse_tbf_stats(text: str) -> TbfStats | None:
    """The root ``tbf`` of ``tc -s -j qdisc show dev lo`` output, None if there is none
    (ConfigError for output that is not what tc writes)."""
    if len(text) > _MAX_TC_OUTPUT:
        raise ConfigError(f"tc output is over {_MAX_TC_OUTPUT} bytes")
    try:
        doc: Any = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"tc output is not JSON: {exc}") from None
    if not isinstance(doc, list) or not all(isinstance(q, dict) for q in doc):
        raise ConfigError("tc output is not a list of qdiscs")
    roots = [q for q in doc if q.get("kind") == "tbf" and q.get("root") is True]
    if not roots:
        return None
    root = roots[0]
    options = root.get("options")
    if not isinstance(options, dict):
        raise ConfigError("tc reported a tbf without options")
    return TbfStats(
        rate_bps=_count(options, "rate") * 8,  # tc -j reports bytes per second
        burst_bytes=_count(options, "burst"),
        bytes=_count(root, "bytes"),
        packets=_count(root, "packets"),
        drops=_count(root, "drops"),
        overlimits=_count(root, "overlimits"),
    )


class KernelShaper:
    """A :class:`~secure_ci.testing.LinkShaper` whose bandwidth the kernel enforces.

    Delay stays with ``shaper`` (no netem here); the rate goes to the namespace loopback's
    token bucket. Only inside :func:`in_namespace` (it would shape the host otherwise).
    """

    def __init__(self, shaper: LinkShaper, *, run: Run = subprocess.run) -> None:
        if not inside_namespace():
            raise ConfigError("kernel shaping runs only inside its own network namespace")
        self.shaper = shaper
        self._run = run
        self.rate_bps: float | None = None

    @property
    def address(self) -> str:
        return self.shaper.address

    def _tc(self, *args: str) -> str:
        try:
            done = self._run(["tc", *args], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"tc {' '.join(args)} failed: {exc}") from None
        if done.returncode != 0:
            raise ConfigError(f"tc {' '.join(args)} failed: {done.stderr.strip()[:200]}")
        return str(done.stdout)

    def shape(self, *, uplink: Link | None = None, downlink: Link | None = None) -> None:
        """Delays to the user-space shaper, the uplink's rate (or the downlink's, if only
        that is given) to the kernel; no rate removes the bucket."""
        link = uplink if uplink is not None else downlink
        if link is None:
            return
        rate = link.rate_bps
        if rate is None:
            if self.rate_bps is not None:
                self._tc("qdisc", "del", "dev", "lo", "root")
        else:
            burst = max(2 * MTU, link.burst_bytes)
            self._tc(
                "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", f"{int(rate)}bit",
                "burst", str(burst), "latency", f"{LATENCY_MS}ms",
            )  # fmt: skip
        self.rate_bps = rate
        self.shaper.shape(
            uplink=None if uplink is None else Link(None, uplink.delay_ms),
            downlink=None if downlink is None else Link(None, downlink.delay_ms),
        )

    def stats(self) -> TbfStats | None:
        """The kernel bucket's counters (None when no rate is set)."""
        return parse_tbf_stats(self._tc("-s", "-j", "qdisc", "show", "dev", "lo"))
