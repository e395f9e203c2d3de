"""When and how the device renews its certificate.

Schedule (pure functions, unit-tested): renew at ``notBefore + fraction * lifetime``
(default two thirds, so a failure leaves a third of the lifetime to retry); retry
failures with capped exponential backoff and "full jitter" (delay uniform in
[0, min(cap, base·2^n)], AWS Architecture Blog, "Exponential Backoff And Jitter", 2015),
so a fleet that lost the server does not come back in lock-step.

Renewal (RFC 7030 §4.2.2 simplereenroll):

- certificate still valid: a NEW key (rotation), TLS client authentication with the
  current certificate and key; the old key and certificate stay until the new
  certificate is stored;
- certificate expired: the TLS handshake would fail with it, so the request goes without
  a client certificate, with a CSR signed by the SAME key as the expired certificate
  (the server accepts that within its grace window, ``[enroll] expired_grace_days``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetward.agent.errors import AgentStateError, ServerUnreachable
from fleetward.agent.est_client import EstClient, build_csr, check_issued
from fleetward.agent.keystore import Keystore, open_keystore, pinned_ca_pem, same_public_key
from fleetward.agent.state import (
    StateLayout,
    load_ca_bundle,
    load_certificate_file,
    load_config,
    replace_durably,
    state_lock,
    write_atomic,
)
from fleetward.agent.transport import HttpxTransport, client_tls_context
from fleetward.clock import Clock, SystemClock
from fleetward.errors import FleetwardError, InvalidInput
from fleetward.model import format_serial

log = structlog.get_logger("fleetward.agent")

DEFAULT_RENEW_FRACTION = 2 / 3
BACKOFF_BASE_SECONDS = 30.0
BACKOFF_CAP_SECONDS = 3600.0
MIN_RETRY_SECONDS = 1.0  # full jitter can draw ~0; never hammer the server in a loop
MAX_SLEEP_SECONDS = 3600.0  # wake at least hourly: suspend/resume and clock steps happen
DEFAULT_EXPIRED_GRACE = dt.timedelta(days=30)  # the server's default expired_grace_days
MIN_RENEWAL_SPACING = dt.timedelta(minutes=1)  # between two successful renewals in `run`

Sleep = Callable[[float], Any]


# --- pure schedule ------------------------------------------------------------------------------


def validate_fraction(fraction: float) -> float:
    """Raises: InvalidInput unless 0 < fraction < 1."""
    if not 0 < fraction < 1:
        raise InvalidInput(f"the renewal fraction must be between 0 and 1, not {fraction}",
                           hint="e.g. --renew-fraction 0.66 renews after two thirds of the "
                                "lifetime")
    return fraction


def renewal_time(not_before: dt.datetime, not_after: dt.datetime,
                 fraction: float = DEFAULT_RENEW_FRACTION) -> dt.datetime:
    """``notBefore + fraction * (notAfter - notBefore)``, truncated to whole seconds."""
    validate_fraction(fraction)
    lifetime = (not_after - not_before).total_seconds()
    return (not_before + dt.timedelta(seconds=int(lifetime * fraction))).replace(microsecond=0)


def next_renewal(not_before: dt.datetime, not_after: dt.datetime,
                 fraction: float = DEFAULT_RENEW_FRACTION,
                 last_renewal: dt.datetime | None = None) -> dt.datetime:
    """The renewal point, but never sooner than ``MIN_RENEWAL_SPACING`` after the last
    renewal: the CA backdates notBefore (``[ca] backdate_seconds``, 5 min by default),
    so with a small fraction the point of a certificate just received can already be in
    the past, and the agent would renew in a tight loop."""
    due = renewal_time(not_before, not_after, fraction)
    if last_renewal is not None:
        due = max(due, last_renewal + MIN_RENEWAL_SPACING)
    return due


def backoff_ceiling(failures: int, base_seconds: float = BACKOFF_BASE_SECONDS,
                    cap_seconds: float = BACKOFF_CAP_SECONDS) -> float:
    """``min(cap, base · 2^(failures-1))`` for ``failures`` ≥ 1."""
    if failures < 1:
        raise ValueError("backoff starts after the first failure")
    exponent = min(failures - 1, 62)  # 2**62 · 30 s is far past any cap; avoids huge ints
    return float(min(cap_seconds, base_seconds * (2 ** exponent)))


def backoff_delay(failures: int, rng: random.Random,
                  base_seconds: float = BACKOFF_BASE_SECONDS,
                  cap_seconds: float = BACKOFF_CAP_SECONDS) -> float:
    """Full jitter: uniform in [0, ceiling], but at least ``MIN_RETRY_SECONDS``."""
    ceiling = backoff_ceiling(failures, base_seconds, cap_seconds)
    return max(MIN_RETRY_SECONDS, rng.uniform(0, ceiling))


@dataclass(frozen=True, slots=True)
class RetryPlan:
    delay_seconds: float
    level: str  # info | warning | error: how loudly to log the failure
    note: str


def plan_retry(now: dt.datetime, failures: int, not_after: dt.datetime, rng: random.Random, *,
               grace: dt.timedelta = DEFAULT_EXPIRED_GRACE,
               base_seconds: float = BACKOFF_BASE_SECONDS,
               cap_seconds: float = BACKOFF_CAP_SECONDS) -> RetryPlan:
    """How long to wait after the ``failures``-th failed renewal, and how loudly to say so.

    The delay never jumps over a boundary where the situation changes: a retry is due
    at notAfter at the latest (then the agent switches to same-key re-enrollment) and at
    the end of the grace window at the latest (the last chance without an operator).
    """
    delay = backoff_delay(failures, rng, base_seconds, cap_seconds)
    grace_end = not_after + grace
    if now < not_after:
        remaining = (not_after - now).total_seconds()
        if delay > remaining:
            return RetryPlan(max(remaining, MIN_RETRY_SECONDS), "warning",
                             "the certificate expires before the next regular retry; "
                             "retrying when it expires, with the same key")
        return RetryPlan(delay, "warning" if failures >= 3 else "info",
                         "renewal failed; the current certificate is still valid")
    if now < grace_end:
        remaining = (grace_end - now).total_seconds()
        return RetryPlan(min(delay, max(remaining, MIN_RETRY_SECONDS)), "error",
                         "the certificate has EXPIRED; retrying with the same key while the "
                         f"server's grace window lasts (until {grace_end:%Y-%m-%d %H:%M} UTC)")
    return RetryPlan(delay, "error",
                     "the certificate expired beyond the re-enrollment grace window: the "
                     "device needs a new bootstrap token from the operator "
                     "(fleetward-agent enroll)")


# --- state changes --------------------------------------------------------------------------------


def install_certificate(layout: StateLayout, keystore: Keystore, cert: x509.Certificate, *,
                        rotated: bool) -> None:
    """Store ``cert``; if it certifies the pending key, make that key current.

    Order: cert.pem.new (the new certificate is stored) → pending key becomes current →
    cert.pem replaced → old key destroyed. ``recover_interrupted`` finishes a crash at
    any step.
    """
    write_atomic(layout.pending_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    if rotated:
        keystore.commit_pending()
    replace_durably(layout.pending_cert, layout.cert)
    keystore.finish()


def recover_interrupted(layout: StateLayout, keystore: Keystore) -> None:
    """Finish (or undo) a renewal that stopped half-way (power cut, kill -9)."""
    if layout.pending_cert.exists():
        try:
            new = x509.load_pem_x509_certificate(layout.pending_cert.read_bytes())
        except ValueError:
            layout.pending_cert.unlink()
            return
        pending = keystore.pending_key()
        if pending is not None and same_public_key(pending.public_key(), new.public_key()):
            log.warning("finishing an interrupted renewal", step="commit key")
            install_certificate(layout, keystore, new, rotated=True)
        elif same_public_key(keystore.private_key().public_key(), new.public_key()):
            log.warning("finishing an interrupted renewal", step="replace certificate")
            install_certificate(layout, keystore, new, rotated=False)
        else:
            layout.pending_cert.unlink()
        return
    if layout.cert.exists() and same_public_key(
            keystore.private_key().public_key(), load_certificate_file(layout.cert).public_key()):
        keystore.finish()


@dataclass(frozen=True, slots=True)
class AgentStatus:
    device_id: str
    server_url: str
    keystore: str
    serial: str
    not_before: dt.datetime
    not_after: dt.datetime
    next_renewal: dt.datetime
    state: str  # valid | due | expired


@dataclass(frozen=True, slots=True)
class RenewOutcome:
    renewed: bool
    mode: str  # not-due | new-key | expired-same-key
    certificate: x509.Certificate
    next_renewal: dt.datetime


class Agent:
    """A device's enrolled identity in a state directory, and what it can do with it."""

    def __init__(self, layout: StateLayout, *, clock: Clock | None = None,
                 sleep: Sleep = time.sleep) -> None:
        self.layout = layout
        self.clock = clock or SystemClock()
        self.sleep = sleep
        config = load_config(layout)
        self.device_id = config.device_id
        self.server_url = config.server_url
        self.est_label = config.est_label
        self.keystore = open_keystore(layout, config)

    def certificate(self) -> x509.Certificate:
        return load_certificate_file(self.layout.cert)

    def status(self, fraction: float = DEFAULT_RENEW_FRACTION) -> AgentStatus:
        cert = self.certificate()
        now = self.clock.now()
        due = renewal_time(cert.not_valid_before_utc, cert.not_valid_after_utc, fraction)
        state = "expired" if now >= cert.not_valid_after_utc else (
            "due" if now >= due else "valid")
        return AgentStatus(self.device_id, self.server_url, self.keystore.kind,
                           format_serial(cert.serial_number), cert.not_valid_before_utc,
                           cert.not_valid_after_utc, due, state)

    def _client(self, transport: Any) -> EstClient:
        return EstClient(transport, label=self.est_label, sleep=self.sleep, now=self.clock.now)

    def renew(self, *, force: bool = False,
              fraction: float = DEFAULT_RENEW_FRACTION) -> RenewOutcome:
        """Renew if due (or ``force``): new key while valid, same key once expired.

        Raises:
            AgentStateError: not enrolled, or another agent holds the state lock.
            ServerRefused, ServerUnreachable, TrustBootstrapFailed, KeyUnavailable: the
                renewal failed; the current certificate and key are unchanged.
        """
        validate_fraction(fraction)
        with state_lock(self.layout):
            recover_interrupted(self.layout, self.keystore)
            cert = self.certificate()
            now = self.clock.now()
            due = renewal_time(cert.not_valid_before_utc, cert.not_valid_after_utc, fraction)
            if not force and now < due:
                return RenewOutcome(False, "not-due", cert, due)
            trusted = load_ca_bundle(self.layout.ca)
            if now >= cert.not_valid_after_utc:
                new = self._reenroll_expired(trusted)
                mode = "expired-same-key"
            else:
                new = self._reenroll_new_key(trusted)
                mode = "new-key"
            log.info("certificate renewed", device=self.device_id, mode=mode,
                     serial=format_serial(new.serial_number),
                     not_after=new.not_valid_after_utc.isoformat())
            return RenewOutcome(True, mode, new, renewal_time(
                new.not_valid_before_utc, new.not_valid_after_utc, fraction))

    def _reenroll_new_key(self, trusted: list[x509.Certificate]) -> x509.Certificate:
        # A pending key left by an attempt whose answer never came is reused: the server
        # may have certified it already, and then resends that certificate instead of
        # refusing the superseded one we still hold.
        key = self.keystore.pending_key() or self.keystore.create_pending()
        try:
            csr = build_csr(self.device_id, key)
            transport = self.keystore.mtls_transport(self.server_url)
            with contextlib.closing(transport):
                certs = self._client(transport).simplereenroll(csr)
            new = check_issued(certs, device_id=self.device_id, public_key=key.public_key(),
                               trusted=trusted, now=self.clock.now())
        except ServerUnreachable:
            raise  # keep the pending key for the retry (see above)
        except BaseException:
            self.keystore.discard_pending()
            raise
        install_certificate(self.layout, self.keystore, new, rotated=True)
        return new

    def _reenroll_expired(self, trusted: list[x509.Certificate]) -> x509.Certificate:
        # RFC 7030 §3.3.2 lets the server authenticate by other means than a valid client
        # certificate; Fleetward's is a CSR signed by the expired certificate's own key.
        key = self.keystore.private_key()
        csr = build_csr(self.device_id, key)
        context = client_tls_context(cadata=pinned_ca_pem(self.layout))
        with contextlib.closing(HttpxTransport(self.server_url, context)) as transport:
            certs = self._client(transport).simplereenroll(csr)
        new = check_issued(certs, device_id=self.device_id, public_key=key.public_key(),
                           trusted=trusted, now=self.clock.now())
        install_certificate(self.layout, self.keystore, new, rotated=False)
        return new

    def run(self, *, fraction: float = DEFAULT_RENEW_FRACTION,
            rng: random.Random | None = None, stop: threading.Event | None = None,
            grace: dt.timedelta = DEFAULT_EXPIRED_GRACE,
            base_seconds: float = BACKOFF_BASE_SECONDS,
            cap_seconds: float = BACKOFF_CAP_SECONDS, max_renewals: int | None = None) -> int:
        """Renew at every renewal point until ``stop`` is set (or ``max_renewals`` done).

        Sleeps go through ``self.sleep`` in chunks of at most an hour and the clock is
        read again after each, so a suspended device or a stepped clock is noticed.
        Returns the number of renewals done.
        """
        validate_fraction(fraction)
        rng = rng or random.SystemRandom()
        failures = 0
        renewals = 0
        last_renewal: dt.datetime | None = None
        while not (stop is not None and stop.is_set()):
            if max_renewals is not None and renewals >= max_renewals:
                break
            cert = self.certificate()
            now = self.clock.now()
            due = next_renewal(cert.not_valid_before_utc, cert.not_valid_after_utc, fraction,
                               last_renewal)
            if failures == 0 and now < due:
                wait = min((due - now).total_seconds(), MAX_SLEEP_SECONDS)
                log.debug("waiting for the renewal point", until=due.isoformat())
                self.sleep(wait)
                continue
            try:
                self.renew(force=True, fraction=fraction)
            except FleetwardError as exc:
                failures += 1
                plan = plan_retry(self.clock.now(), failures, cert.not_valid_after_utc, rng,
                                  grace=grace, base_seconds=base_seconds,
                                  cap_seconds=cap_seconds)
                getattr(log, plan.level)("renewal failed", error=exc.message, hint=exc.hint,
                                         failures=failures, retry_in_s=round(plan.delay_seconds),
                                         note=plan.note)
                self.sleep(plan.delay_seconds)
                continue
            failures = 0
            renewals += 1
            last_renewal = self.clock.now()
        return renewals


def open_agent(layout: StateLayout, *, clock: Clock | None = None,
               sleep: Sleep = time.sleep) -> Agent:
    """An ``Agent`` for an enrolled state directory.

    Raises:
        AgentStateError: not enrolled (no agent.toml / cert.pem).
    """
    if not layout.root.is_dir():
        raise AgentStateError(f"the state directory {layout.root} does not exist",
                              hint="enroll first: fleetward-agent enroll --state-dir "
                                   f"{layout.root} …")
    return Agent(layout, clock=clock, sleep=sleep)


__all__ = ["DEFAULT_RENEW_FRACTION", "Agent", "AgentStatus", "RenewOutcome", "RetryPlan",
           "backoff_ceiling", "backoff_delay", "install_certificate", "next_renewal", "open_agent",
           "plan_retry", "recover_interrupted", "renewal_time", "validate_fraction"]
