"""Live estimates per edge and of the device, updated by every completed task.

No clock synchronisation is needed: the device measures a task's round trip on its own
clock, the edge reports how long the task queued and computed on its clock, and the
difference is the network time. Every update takes ``now`` (the device's monotonic clock, in
seconds) so estimates know their age; durations are milliseconds.

- :class:`LinkEstimator`: network time = intercept + bytes × ms-per-byte, by recursive least
  squares with forgetting, and CUSUMs on the log prediction ratio that restart the fit when
  the bandwidth (or the RTT) steps.
- :class:`RttEstimator`: smoothed RTT and its deviation from pings (RFC 6298's estimator).
- :class:`Ewma`: mean and variance of the edge's reported queue wait.
- :class:`SpeedEstimator`: measured / profiled time (device head, edge tail), geometric EWMA.
- :class:`EdgeEstimator` bundles one edge's estimators and snapshots an :class:`EdgeEstimate`.
"""

from __future__ import annotations

import math

from secure_ci.exceptions import ConfigError
from secure_ci.plan._cost import EdgeEstimate

__all__ = ["EdgeEstimator", "Ewma", "LinkEstimator", "RttEstimator", "SpeedEstimator"]

_MB = 1e6  # the link fit works in MB and ms, which keeps its covariance well conditioned
_NOISE0 = 0.01  # the link's relative noise variance before any sample (10 %)


def _sample(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _rate(value: float, what: str) -> float:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{what} must be in (0, 1], got {value}")
    return value


class _Aged:
    updated_at: float | None = None
    count: int = 0

    def _touch(self, now: float) -> None:
        now = _sample(now, "now")
        self.updated_at = now if self.updated_at is None else max(self.updated_at, now)
        self.count += 1

    def age(self, now: float) -> float:
        """Seconds since the last update (``inf`` before the first)."""
        return math.inf if self.updated_at is None else max(0.0, now - self.updated_at)


class Ewma(_Aged):
    """Exponentially weighted mean and variance (West's incremental form)."""

    def __init__(self, alpha: float = 0.2, *, initial: float = 0.0) -> None:
        self.alpha = _rate(alpha, "alpha")
        self.mean = initial
        self.var = 0.0

    def update(self, value: float, now: float) -> None:
        value = _sample(value, "sample")
        if self.count == 0:
            self.mean, self.var = value, 0.0
        else:
            diff = value - self.mean
            step = self.alpha * diff
            self.mean += step
            self.var = (1.0 - self.alpha) * (self.var + diff * step)
        self._touch(now)

    @property
    def std(self) -> float:
        return math.sqrt(self.var)


class RttEstimator(_Aged):
    """Smoothed round-trip time and mean deviation from pings (RFC 6298 gains)."""

    def __init__(self, *, alpha: float = 1 / 8, beta: float = 1 / 4) -> None:
        self.alpha = _rate(alpha, "alpha")
        self.beta = _rate(beta, "beta")
        self.srtt_ms = math.nan
        self.rttvar_ms = math.nan

    def update(self, rtt_ms: float, now: float) -> None:
        rtt_ms = max(0.0, _sample(rtt_ms, "rtt_ms"))
        if self.count == 0:
            self.srtt_ms, self.rttvar_ms = rtt_ms, rtt_ms / 2
        else:
            err = abs(self.srtt_ms - rtt_ms)
            self.rttvar_ms = (1 - self.beta) * self.rttvar_ms + self.beta * err
            self.srtt_ms = (1 - self.alpha) * self.srtt_ms + self.alpha * rtt_ms
        self._touch(now)

    def timeout_ms(self, k: float = 4.0) -> float:
        """``srtt + k * rttvar`` (``inf`` before the first ping)."""
        return math.inf if self.count == 0 else self.srtt_ms + k * self.rttvar_ms


class SpeedEstimator(_Aged):
    """How much slower than profiled something runs: EWMA of log(measured / profiled)."""

    def __init__(self, alpha: float = 0.2) -> None:
        self._log = Ewma(alpha)

    def update(self, measured_ms: float, profiled_ms: float, now: float) -> None:
        measured_ms = _sample(measured_ms, "measured_ms")
        profiled_ms = _sample(profiled_ms, "profiled_ms")
        if profiled_ms <= 0.0:
            return  # nothing was profiled to compare with (e.g. edge-only on the device)
        self._log.update(math.log(max(measured_ms, 1e-6) / profiled_ms), now)
        self._touch(now)

    @property
    def factor(self) -> float:
        """Multiplier on profiled times (1.0 before any sample)."""
        return math.exp(self._log.mean)

    @property
    def log_std(self) -> float:
        return self._log.std


class LinkEstimator(_Aged):
    """Network time of a transfer: ``intercept_ms + nbytes * ms_per_byte``.

    Recursive least squares with forgetting factor ``forgetting`` (about ``1 / (1 - λ)``
    samples of memory) on *relative* errors: each sample is weighted by its predicted time,
    because transfer jitter grows with the transfer, and an unweighted fit would let a few
    large transfers drown the intercept that the pings measure. The covariance is bounded (by
    the prior's, or by each coefficient's own size), so it cannot wind up while the device
    keeps sending one size.

    A step detector watches ``z = log(measured / predicted)``: two-sided CUSUMs with slack
    ``cusum_k`` that fire at ``cusum_h``, one for small transfers (pings, logits: at most
    ``small_bytes`` and predicted to take less than the intercept in bytes) and one for the
    others, so that neither kind drowns the other's step. When it fires on a small transfer
    the intercept (the RTT) stepped, otherwise the slope (the bandwidth): that coefficient
    is reopened wide, the other is held at its value, and the surprising sample refits the
    line. One sample after a bandwidth step the slope is right again. (Any transfer above
    ``small_bytes`` counts as large whatever the fit says: a badly fitted slope would
    otherwise blame the intercept for its own error.)
    """

    def __init__(
        self,
        *,
        prior_intercept_ms: float = 10.0,
        prior_ms_per_byte: float = 8e-4,
        prior_std: tuple[float, float] = (50.0, 1e-2),
        forgetting: float = 0.95,
        cusum_k: float = 0.3,
        cusum_h: float = 0.6,
        warmup: int = 3,
        floor_ms: float = 0.5,
        small_bytes: int = 2048,
    ) -> None:
        self.forgetting = _rate(forgetting, "forgetting")
        if not (cusum_k >= 0 and cusum_h > 0 and warmup >= 0 and floor_ms > 0):
            raise ConfigError("cusum_k >= 0, cusum_h > 0, warmup >= 0 and floor_ms > 0 needed")
        if min(prior_intercept_ms, prior_ms_per_byte) < 0 or min(prior_std) <= 0:
            raise ConfigError("link priors must be >= 0 with positive standard deviations")
        self.cusum_k, self.cusum_h, self.warmup, self.floor_ms = cusum_k, cusum_h, warmup, floor_ms
        self.small_bytes = small_bytes
        # coefficients (ms, ms per MB) and P = [[p00, p01], [p01, p11]], as plain floats:
        # a 2x2 fit is cheaper in Python than through numpy's per-call overhead
        self._theta = [float(prior_intercept_ms), float(prior_ms_per_byte * _MB)]
        self._noise_var = _NOISE0  # relative, replaced by the residuals' EWMA
        # P is the coefficients' covariance divided by the relative noise variance
        self._p0 = (prior_std[0] ** 2 / _NOISE0, (prior_std[1] * _MB) ** 2 / _NOISE0)
        self._p = [self._p0[0], 0.0, self._p0[1]]
        self._cusum = [[0.0, 0.0], [0.0, 0.0]]  # [small, large transfers][up, down]
        self._since_reset = 0
        self.steps = 0

    @property
    def intercept_ms(self) -> float:
        return max(0.0, self._theta[0])

    @property
    def ms_per_byte(self) -> float:
        return max(0.0, self._theta[1]) / _MB

    @property
    def relative_std(self) -> float:
        """Estimated relative jitter of one transfer (0.1 = ±10 %)."""
        return math.sqrt(self._noise_var)

    def predict_ms(self, nbytes: float) -> float:
        return self.intercept_ms + nbytes * self.ms_per_byte

    def var_coeffs(self) -> tuple[float, float, float]:
        """Predictive variance ``c0 + c1 * b + c2 * b²`` (ms²) of one transfer of b bytes.

        The jitter of the transfer itself (relative, so it grows with the prediction) plus
        the uncertainty of the fitted line.
        """
        s2, (p00, p01, p11) = self._noise_var, self._p
        a, b = self.intercept_ms, self.ms_per_byte * _MB
        return (s2 * (a * a + p00), s2 * 2.0 * (a * b + p01) / _MB, s2 * (b * b + p11) / _MB**2)

    def predict_std_ms(self, nbytes: float) -> float:
        c0, c1, c2 = self.var_coeffs()
        return math.sqrt(max(0.0, c0 + c1 * nbytes + c2 * nbytes * nbytes))

    def probe_bytes(
        self, *, ratio: float = 2.0, min_ms: float = 20.0, low: int = 1024, high: int = 1 << 18
    ) -> int:
        """Size of a padded probe whose bytes take ``ratio`` × the intercept (>= ``min_ms``).

        A probe measures the bandwidth while no features flow (device-only, tiny boundaries):
        its bytes must stand out of the RTT's jitter so that a step is visible in one probe,
        and stay small enough to cost a slow link little (``low``..``high`` bytes).
        """
        rate = self.ms_per_byte
        size = max(min_ms, ratio * self.intercept_ms) / rate if rate > 0 else high
        return int(min(high, max(low, size)))

    def update(self, nbytes: float, network_ms: float, now: float) -> bool:
        """Fit one transfer (or ping) of ``nbytes``; True when a step was detected."""
        nbytes = _sample(nbytes, "nbytes")
        network_ms = max(0.0, _sample(network_ms, "network_ms"))
        if nbytes < 0:
            raise ConfigError(f"nbytes must be >= 0, got {nbytes}")
        stepped = False
        if self._since_reset >= self.warmup:
            bytes_ms = nbytes * self.ms_per_byte
            kind = int(nbytes > self.small_bytes or bytes_ms >= self.intercept_ms)
            z = math.log(
                max(network_ms, self.floor_ms) / max(self.predict_ms(nbytes), self.floor_ms)
            )
            sums = self._cusum[kind]
            sums[0] = max(0.0, sums[0] + z - self.cusum_k)
            sums[1] = max(0.0, sums[1] - z - self.cusum_k)
            if max(sums) > self.cusum_h:
                stepped = True
                self._restart(slope=bool(kind))
        self._fit(nbytes, network_ms)
        self._since_reset += 1
        self._touch(now)
        return stepped

    def _restart(self, *, slope: bool) -> None:
        self.steps += 1
        opened, kept = (1, 0) if slope else (0, 1)
        # wide open: at least the prior, and room for a step of 10x the current value
        wide = max(self._p0[opened], (10.0 * self._theta[opened]) ** 2 / _NOISE0)
        held = max((0.05 * self._theta[kept]) ** 2 / _NOISE0, self._p0[kept] * 1e-8)
        self._p = [held, 0.0, wide] if slope else [wide, 0.0, held]
        self._cusum = [[0.0, 0.0], [0.0, 0.0]]
        self._since_reset = 0

    def _fit(self, nbytes: float, y: float) -> None:
        """One step of weighted RLS with forgetting on the relative error (scaled by ŷ)."""
        lam, (t0, t1), (p00, p01, p11) = self.forgetting, self._theta, self._p
        mb = nbytes / _MB
        scale = max(self.predict_ms(nbytes), self.floor_ms)
        x0, x1 = 1.0 / scale, mb / scale
        px0, px1 = p00 * x0 + p01 * x1, p01 * x0 + p11 * x1
        den = lam + x0 * px0 + x1 * px1
        residual = (y - t0 - t1 * mb) / scale
        self._theta = [t0 + px0 * residual / den, t1 + px1 * residual / den]
        p00 = (p00 - px0 * px0 / den) / lam
        p01 = (p01 - px0 * px1 / den) / lam
        p11 = (p11 - px1 * px1 / den) / lam
        # bounded covariance (no wind-up): the prior's, or the coefficient's own size
        b0 = math.sqrt(min(1.0, max(self._p0[0], self._theta[0] ** 2 / _NOISE0) / max(p00, 1e-300)))
        b1 = math.sqrt(min(1.0, max(self._p0[1], self._theta[1] ** 2 / _NOISE0) / max(p11, 1e-300)))
        self._p = [p00 * b0 * b0, p01 * b0 * b1, p11 * b1 * b1]
        # the a-priori residual's variance is noise * (λ + xᵀPx) / λ: normalise it away
        sample = residual * residual * lam / den
        self._noise_var = sample if self.count == 0 else 0.9 * self._noise_var + 0.1 * sample
        self._noise_var = max(self._noise_var, 1e-12)


class EdgeEstimator:
    """Everything the device estimates about one edge, fed by results and pings."""

    def __init__(
        self,
        *,
        link: LinkEstimator | None = None,
        queue_alpha: float = 0.3,
        speed_alpha: float = 0.2,
        ping_bytes: int = 64,
    ) -> None:
        self.link = link if link is not None else LinkEstimator()
        self.rtt = RttEstimator()
        self.queue = Ewma(queue_alpha)
        self.speed = SpeedEstimator(speed_alpha)
        self.ping_bytes = ping_bytes

    def observe_result(
        self,
        *,
        nbytes: float,
        round_trip_ms: float,
        queue_ms: float,
        compute_ms: float,
        profiled_compute_ms: float,
        now: float,
    ) -> bool:
        """One completed task: the device's send-to-result time and the edge's report.

        ``profiled_compute_ms`` is what the package's edge profile says the tail (plus
        decode) should take. Returns True when the link's step detector fired.
        """
        queue_ms = max(0.0, _sample(queue_ms, "queue_ms"))
        compute_ms = max(0.0, _sample(compute_ms, "compute_ms"))
        network_ms = _sample(round_trip_ms, "round_trip_ms") - queue_ms - compute_ms
        self.queue.update(queue_ms, now)
        self.speed.update(compute_ms, profiled_compute_ms, now)
        return self.link.update(nbytes, max(0.0, network_ms), now)

    def observe_ping(self, rtt_ms: float, now: float, *, nbytes: float | None = None) -> bool:
        """A ping's round trip: the RTT (of an unpadded ping), and a transfer of ``nbytes``
        (a padded probe; default :attr:`ping_bytes`) for the link fit."""
        if nbytes is None or nbytes <= self.ping_bytes:
            self.rtt.update(rtt_ms, now)
        return self.link.update(self.ping_bytes if nbytes is None else nbytes, rtt_ms, now)

    def estimate(self) -> EdgeEstimate:
        return EdgeEstimate(
            intercept_ms=self.link.intercept_ms,
            ms_per_byte=self.link.ms_per_byte,
            queue_ms=max(0.0, self.queue.mean),
            speed_factor=self.speed.factor,
            var_coeffs=self.link.var_coeffs(),
            queue_var=self.queue.var,
            link_steps=self.link.steps,
        )
