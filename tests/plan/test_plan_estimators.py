"""Estimators: hand-computed updates, RLS convergence, and the link's step detector."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from secure_ci.exceptions import ConfigError
from secure_ci.plan import EdgeEstimator, Ewma, LinkEstimator, RttEstimator, SpeedEstimator


def test_ewma_by_hand() -> None:
    ewma = Ewma(0.5)
    assert ewma.age(3.0) == math.inf
    ewma.update(10.0, now=1.0)
    assert (ewma.mean, ewma.var, ewma.count) == (10.0, 0.0, 1)
    ewma.update(20.0, now=2.0)
    # diff 10, step 5: mean 15, var (1 - 0.5) * (0 + 10 * 5) = 25
    assert (ewma.mean, ewma.var, ewma.std) == (15.0, 25.0, 5.0)
    assert ewma.age(3.5) == 1.5
    ewma.update(15.0, now=1.0)  # a late report never moves the clock back
    assert ewma.updated_at == 2.0
    with pytest.raises(ConfigError):
        Ewma(0.0)
    with pytest.raises(ConfigError):
        ewma.update(math.nan, now=3.0)


def test_rtt_follows_rfc6298() -> None:
    rtt = RttEstimator()
    assert rtt.timeout_ms() == math.inf
    rtt.update(100.0, now=0.0)
    assert (rtt.srtt_ms, rtt.rttvar_ms, rtt.timeout_ms()) == (100.0, 50.0, 300.0)
    rtt.update(60.0, now=1.0)
    # rttvar = 3/4 * 50 + 1/4 * |100 - 60| = 47.5; srtt = 7/8 * 100 + 1/8 * 60 = 95
    assert (rtt.srtt_ms, rtt.rttvar_ms) == (95.0, 47.5)
    assert rtt.timeout_ms(k=2) == 190.0


def test_speed_factor_is_a_geometric_mean_of_ratios() -> None:
    speed = SpeedEstimator(alpha=0.5)
    assert speed.factor == 1.0
    speed.update(30.0, 10.0, now=0.0)
    assert speed.factor == pytest.approx(3.0)
    speed.update(120.0, 10.0, now=1.0)
    assert speed.factor == pytest.approx(math.sqrt(3.0 * 12.0))
    speed.update(5.0, 0.0, now=2.0)  # nothing profiled to compare with: ignored
    assert speed.count == 2
    assert speed.log_std > 0


def test_edge_estimator_subtracts_edge_time_from_the_round_trip() -> None:
    est = EdgeEstimator()
    for k in range(50):
        nbytes = 1000.0 * (1 + k % 7)
        network = 4.0 + nbytes * 0.002  # the truth: 4 ms + 2 µs per byte
        est.observe_result(
            nbytes=nbytes,
            round_trip_ms=network + 3.0 + 8.0,
            queue_ms=3.0,
            compute_ms=8.0,
            profiled_compute_ms=4.0,
            now=k * 0.1,
        )
    snapshot = est.estimate()
    assert snapshot.intercept_ms == pytest.approx(4.0, rel=1e-3)
    assert snapshot.ms_per_byte == pytest.approx(0.002, rel=1e-3)
    assert snapshot.queue_ms == pytest.approx(3.0)
    assert snapshot.speed_factor == pytest.approx(2.0)
    est.observe_ping(10.0, now=6.0)
    assert est.rtt.srtt_ms == 10.0
    assert est.link.count == 51


def test_link_prior_and_probe_size() -> None:
    link = LinkEstimator(prior_intercept_ms=20.0, prior_ms_per_byte=1e-3)
    assert link.predict_ms(1000) == pytest.approx(21.0)
    assert link.predict_std_ms(1000) > link.predict_std_ms(0) > 0
    # bytes for 2 x intercept = 40 ms at 1 µs/B; bounded below and above
    assert link.probe_bytes() == 40_000
    assert link.probe_bytes(ratio=0.0, min_ms=0.1) == 1024
    assert link.probe_bytes(ratio=1e6) == 1 << 18
    with pytest.raises(ConfigError):
        LinkEstimator(forgetting=1.5)
    with pytest.raises(ConfigError):
        LinkEstimator(prior_std=(0.0, 1.0))
    with pytest.raises(ConfigError):
        link.update(-1.0, 10.0, now=0.0)


@settings(max_examples=100)
@given(
    intercept=st.floats(0.5, 200.0),
    mbps=st.floats(0.5, 1000.0),
    small=st.integers(0, 2048),
    large=st.lists(st.integers(10_000, 2_000_000), min_size=1, max_size=3),
)
def test_rls_converges_to_the_true_line_on_noiseless_data(
    intercept: float, mbps: float, small: int, large: list[int]
) -> None:
    """Pings (or other small frames) and feature transfers, without any noise."""
    slope = 8.0 / (mbps * 1e3)  # ms per byte
    sizes = [small, *large]
    # the sizes must tell the slope from the intercept (a few % of it at least)
    assume(slope * (max(sizes) - small) >= 0.05 * intercept)
    link = LinkEstimator()
    for k in range(400):
        nbytes = sizes[k % len(sizes)]
        link.update(nbytes, intercept + slope * nbytes, now=k * 0.01)
    scale = intercept + slope * max(sizes)
    assert abs(link.intercept_ms - intercept) <= 1e-3 * scale
    assert abs(link.ms_per_byte - slope) * max(sizes) <= 1e-3 * scale
    for nbytes in sizes:
        assert link.predict_ms(nbytes) == pytest.approx(intercept + slope * nbytes, rel=1e-3)
    assert link.steps == 0 or link.count > 0


def _stream(
    rng: np.random.Generator, intercept: float, slope: float, sizes: list[float], n: int
) -> list[tuple[float, float]]:
    """n samples: a 64-byte ping every fifth, the sizes in turn otherwise, ±20 % jitter."""
    out = []
    for k in range(n):
        nbytes = 64.0 if k % 5 == 0 else sizes[k % len(sizes)]
        out.append((nbytes, (intercept + slope * nbytes) * rng.uniform(0.8, 1.2)))
    return out


@settings(max_examples=60)
@given(
    intercept=st.floats(1.0, 200.0),
    mbps=st.floats(0.5, 200.0),
    sizes=st.lists(st.floats(1e3, 1e6), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_step_detector_is_silent_on_stationary_noise(
    intercept: float, mbps: float, sizes: list[float], seed: int
) -> None:
    link = LinkEstimator()
    samples = _stream(np.random.default_rng(seed), intercept, 8.0 / (mbps * 1e3), sizes, 1000)
    fired = [k for k, (b, ms) in enumerate(samples) if link.update(b, ms, now=k * 0.1)]
    assert [k for k in fired if k >= 20] == []  # the first samples may correct a bad prior
    assert link.relative_std < 0.2


@settings(max_examples=60)
@given(
    intercept=st.floats(1.0, 200.0),
    share=st.floats(2.0, 50.0),
    factor=st.sampled_from([10.0, 0.1]),
    seed=st.integers(0, 2**32 - 1),
)
def test_step_detector_fires_within_a_few_samples_of_a_10x_step(
    intercept: float, share: float, factor: float, seed: int
) -> None:
    """A 10x bandwidth step on transfers whose bytes take ``share`` x the intercept.

    (The transfers must be dominated by their bytes: at share 1, a 10x faster link makes
    them only 1.8x faster, which ±20 % jitter hides for longer.)
    """
    size = 100_000.0
    slope = share * intercept / size
    rng = np.random.default_rng(seed)
    link = LinkEstimator()
    for k, (b, ms) in enumerate(_stream(rng, intercept, slope, [size], 300)):
        link.update(b, ms, now=k * 0.1)
    steps_before = link.steps
    transfers = 0
    for k, (b, ms) in enumerate(_stream(rng, intercept, slope / factor, [size], 30)):
        transfers += b == size
        if link.update(b, ms, now=30.0 + k * 0.1):
            break
    else:
        pytest.fail("the step was never detected")
    assert transfers <= 5
    assert link.steps == steps_before + 1
    # a few samples later the fit predicts the new link within the jitter
    for k, (b, ms) in enumerate(_stream(rng, intercept, slope / factor, [size], 10)):
        link.update(b, ms, now=40.0 + k * 0.1)
    new = intercept + slope / factor * size
    assert link.predict_ms(size) == pytest.approx(new, rel=0.2)


def test_rtt_step_seen_by_pings_moves_the_intercept() -> None:
    rng = np.random.default_rng(1)
    link = LinkEstimator()
    size, slope = 200_000.0, 1e-3  # 200 ms of bytes
    for k, (b, ms) in enumerate(_stream(rng, 20.0, slope, [size], 200)):
        link.update(b, ms, now=k * 0.1)
    for k, (b, ms) in enumerate(_stream(rng, 120.0, slope, [size], 40)):
        link.update(b, ms, now=20.0 + k * 0.1)
    assert link.steps >= 1
    assert link.intercept_ms == pytest.approx(120.0, rel=0.2)
    assert link.ms_per_byte == pytest.approx(slope, rel=0.2)
