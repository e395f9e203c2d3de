"""When the agent renews, and how it backs off.

Threats: a renewal point computed wrongly (renewing far too late, or on every start); a
fleet that lost its server retrying in lock-step (no jitter) or hammering it (no floor,
no cap); a backoff that sleeps straight past notAfter or past the end of the server's
grace window, so the device silently loses its identity; a failing renewal that damages
the current certificate or key.
"""

from __future__ import annotations

import datetime as dt
import random
import statistics
import threading
from pathlib import Path

import pytest
import structlog

from fleetward.agent.renewal import (
    BACKOFF_CAP_SECONDS,
    MAX_SLEEP_SECONDS,
    MIN_RENEWAL_SPACING,
    MIN_RETRY_SECONDS,
    Agent,
    backoff_ceiling,
    backoff_delay,
    next_renewal,
    plan_retry,
    renewal_time,
)
from fleetward.agent.state import load_certificate_file
from fleetward.clock import FrozenClock
from fleetward.errors import InvalidInput
from tests.conftest import free_port
from tests.unit.test_agent_est_client import NOW, Pki
from tests.unit.test_agent_state import enrolled_file_state

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


# --- renewal point -------------------------------------------------------------------------


def test_default_renewal_point_is_two_thirds_of_the_lifetime() -> None:
    assert renewal_time(T0, T0 + dt.timedelta(days=90)) == T0 + dt.timedelta(days=60)


@pytest.mark.parametrize(("fraction", "seconds"), [(0.5, 43200), (0.75, 64800), (0.01, 864)])
def test_renewal_fraction_is_configurable(fraction: float, seconds: int) -> None:
    assert renewal_time(T0, T0 + dt.timedelta(days=1), fraction) - T0 == dt.timedelta(
        seconds=seconds)


def test_renewal_point_uses_the_real_not_before_not_issue_time() -> None:
    """The CA backdates notBefore (device clocks run behind); the fraction is of the
    certificate's own lifetime."""
    not_before = T0 - dt.timedelta(minutes=5)
    assert renewal_time(not_before, T0 + dt.timedelta(hours=10), 0.5) == (
        T0 + dt.timedelta(hours=4, minutes=57, seconds=30))


def test_a_backdated_fresh_certificate_is_not_renewed_again_at_once() -> None:
    """notBefore is backdated 5 min; with fraction 1e-6 the point is already past."""
    not_before = T0 - dt.timedelta(minutes=5)
    not_after = T0 + dt.timedelta(days=365)
    assert renewal_time(not_before, not_after, 1e-6) < T0
    assert next_renewal(not_before, not_after, 1e-6, last_renewal=T0) == (
        T0 + MIN_RENEWAL_SPACING)
    # the spacing never delays a normal renewal point
    assert next_renewal(not_before, not_after, last_renewal=T0) == renewal_time(
        not_before, not_after)


@pytest.mark.parametrize("fraction", [0, 1, -0.5, 1.5])
def test_renewal_fraction_outside_0_1_is_refused(fraction: float) -> None:
    with pytest.raises(InvalidInput, match="between 0 and 1"):
        renewal_time(T0, T0 + dt.timedelta(days=1), fraction)


# --- backoff with full jitter --------------------------------------------------------------


def test_backoff_ceiling_doubles_from_30_seconds_to_one_hour() -> None:
    assert [backoff_ceiling(n) for n in range(1, 10)] == [
        30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert backoff_ceiling(10_000) == BACKOFF_CAP_SECONDS  # no overflow for long outages


@pytest.mark.parametrize("failures", [1, 2, 4, 7, 8, 50])
def test_full_jitter_stays_within_bounds_and_spans_the_range(failures: int) -> None:
    rng = random.Random(failures)
    ceiling = backoff_ceiling(failures)
    draws = [backoff_delay(failures, rng) for _ in range(4000)]
    assert all(MIN_RETRY_SECONDS <= d <= ceiling for d in draws)
    # "full" jitter: the whole [0, ceiling] range is used, centred on its middle
    assert min(draws) < MIN_RETRY_SECONDS + 0.02 * ceiling
    assert max(draws) > 0.98 * ceiling
    assert abs(statistics.fmean(draws) - ceiling / 2) < 0.05 * ceiling


def test_two_devices_do_not_retry_in_lock_step() -> None:
    a = [backoff_delay(5, random.Random(1)) for _ in range(3)]
    b = [backoff_delay(5, random.Random(2)) for _ in range(3)]
    assert a != b


def test_backoff_needs_a_failure_first() -> None:
    with pytest.raises(ValueError, match="first failure"):
        backoff_ceiling(0)


# --- the retry plan around notAfter and the grace window -----------------------------------


def test_a_retry_never_sleeps_past_not_after() -> None:
    not_after = T0 + dt.timedelta(seconds=100)
    for seed in range(200):
        plan = plan_retry(T0, 9, not_after, random.Random(seed))
        assert plan.delay_seconds <= 100
    plan = plan_retry(T0, 9, not_after, random.Random(0))
    assert plan.delay_seconds == 100 and plan.level == "warning"
    assert "same key" in plan.note


def test_far_from_expiry_early_failures_are_quiet() -> None:
    plan = plan_retry(T0, 1, T0 + dt.timedelta(days=30), random.Random(0))
    assert plan.level == "info" and plan.delay_seconds <= 30


def test_after_expiry_every_failure_is_logged_as_an_error_and_stops_at_grace_end() -> None:
    not_after = T0
    grace = dt.timedelta(minutes=10)
    for seed in range(200):
        plan = plan_retry(T0 + dt.timedelta(minutes=9), 9, not_after, random.Random(seed),
                          grace=grace)
        assert plan.level == "error" and "EXPIRED" in plan.note
        assert plan.delay_seconds <= 60  # never jumps over the end of the grace window


def test_beyond_the_grace_window_the_plan_says_a_new_token_is_needed() -> None:
    plan = plan_retry(T0 + dt.timedelta(days=31), 3, T0, random.Random(0))
    assert plan.level == "error"
    assert "new bootstrap token" in plan.note


# --- the run loop, with an injected clock and sleep, against a closed port -----------------


class FakeTime:
    """Sleeping advances the frozen clock; stops the loop after ``limit`` sleeps."""

    def __init__(self, clock: FrozenClock, stop: threading.Event, limit: int) -> None:
        self.clock = clock
        self.stop = stop
        self.limit = limit
        self.sleeps: list[tuple[dt.datetime, float]] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append((self.clock.now(), seconds))
        self.clock.advance(dt.timedelta(seconds=seconds))
        if len(self.sleeps) >= self.limit:
            self.stop.set()


def test_run_waits_for_the_renewal_point_then_backs_off_up_to_expiry_and_beyond(
        tmp_path: Path) -> None:
    """The server is unreachable (a closed port): the loop must sleep until the renewal
    point in chunks of at most an hour, retry with growing jittered delays, try again
    exactly at notAfter, go on loudly after it, and leave the certificate and key alone."""
    pki = Pki.create()
    not_before, not_after = NOW, NOW + dt.timedelta(hours=30)
    layout, _ = enrolled_file_state(
        tmp_path / "state", pki, server_url=f"https://127.0.0.1:{free_port()}",
        not_before=not_before, not_after=not_after)
    cert_before = load_certificate_file(layout.cert)
    key_before = layout.key.read_bytes()
    clock = FrozenClock(not_before + dt.timedelta(hours=1))
    stop = threading.Event()
    fake = FakeTime(clock, stop, limit=80)
    agent = Agent(layout, clock=clock, sleep=fake.sleep)
    due = renewal_time(not_before, not_after)  # 20 h after notBefore
    with structlog.testing.capture_logs() as logs:
        renewals = agent.run(stop=stop, rng=random.Random(7), grace=dt.timedelta(hours=2))
    assert renewals == 0
    waits = [(at, s) for at, s in fake.sleeps if at < due]
    assert all(s <= MAX_SLEEP_SECONDS for _, s in waits)
    assert len(waits) == 19  # 19 one-hour naps from 1 h to 20 h
    failures = [e for e in logs if e["event"] == "renewal failed"]
    assert failures, logs
    first_attempt = fake.sleeps[len(waits)][0]
    assert first_attempt == due  # not a second earlier
    for event in failures:
        assert event["failures"] >= 1
        assert event["retry_in_s"] <= backoff_ceiling(event["failures"]) + 1
    attempts = [at for at, _ in fake.sleeps[len(waits):]]
    assert not_after in attempts  # one attempt right when it expires (then: same key)
    levels_after_expiry = {e["log_level"] for e, at in zip(failures, attempts, strict=False)
                           if at >= not_after}
    assert levels_after_expiry == {"error"}
    assert any("new bootstrap token" in e["note"] for e in failures)
    # nothing was damaged by dozens of failed renewals
    assert load_certificate_file(layout.cert) == cert_before
    assert layout.key.read_bytes() == key_before
    assert not layout.pending_cert.exists()
    # The server never answered, so it may have certified the pending key: that one key is
    # kept and reused by every retry (the server resends its certificate), never replaced.
    assert layout.pending_key.exists()


def test_renew_before_the_renewal_point_does_nothing(tmp_path: Path) -> None:
    pki = Pki.create()
    layout, _ = enrolled_file_state(tmp_path / "state", pki,
                                    server_url=f"https://127.0.0.1:{free_port()}")
    agent = Agent(layout, clock=FrozenClock(NOW + dt.timedelta(days=1)))
    outcome = agent.renew()
    assert not outcome.renewed and outcome.mode == "not-due"
    status = agent.status()
    assert status.state == "valid" and status.next_renewal == outcome.next_renewal
    assert Agent(layout, clock=FrozenClock(NOW + dt.timedelta(days=61))).status().state == "due"
    assert Agent(layout, clock=FrozenClock(NOW + dt.timedelta(days=91))
                 ).status().state == "expired"
