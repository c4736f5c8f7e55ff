"""The breaker as the session keeper (``EdgeLink.keep``) drives it: a dead edge's reconnects.

The keeper reconnects when ``retry_at`` has passed and reports each failed connect with
``failure(now)``, without calling ``allows`` in between. Found by ``secure-ci bench
failover``: a killed edge was re-dialled every 50 ms (about 20 connects a second) for as
long as it stayed down, because a failure of a breaker still OPEN past its ``retry_at`` was
ignored ("one opening per incident"), so the backoff never grew and ``retry_at`` stayed in
the past.
"""

from __future__ import annotations

from secure_ci.device import Breaker


def test_a_dead_edge_is_redialled_less_and_less_often() -> None:
    breaker = Breaker(min_backoff=0.25, max_backoff=8.0)
    now, waits = 0.0, []
    for _ in range(6):
        breaker.failure(now)  # the connect failed
        waits.append(breaker.retry_at - now)
        now = max(now, breaker.retry_at) + 0.01  # the keeper dials again once it may
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]


def test_failures_of_tasks_in_flight_open_the_breaker_once() -> None:
    """What the early return is for: tasks that were in flight when the edge died fail
    together, within the backoff; that is one incident, not several."""
    breaker = Breaker(min_backoff=0.25, max_backoff=8.0)
    for now in (0.0, 0.01, 0.02, 0.1):
        breaker.failure(now)
    assert breaker.retry_at == 0.25
    assert breaker.backoff == 0.25
