"""``fleetward-agent run``: the device's long-running supervisor.

Threads (all stop when ``stop`` is set):

- *source*: reads telemetry (every interval, or per stdin line) into the offline buffer;
- *commands*: runs commands one at a time and queues their results;
- *renewal*: renews the certificate at its renewal point (``renewal.py``'s schedule and
  backoff), then asks the supervisor to reconnect with the new certificate;
- *supervisor* (the caller's thread): opens a session (MQTT or HTTPS), sends results
  first, then buffered records, and when the session breaks opens another after a
  jittered exponential backoff (AWS Architecture Blog, "Exponential Backoff And Jitter":
  full jitter, so a fleet that lost its server does not return in lock-step).

A server that refuses the *identity* (MQTT 5 CONNACK 0x86/0x87/0x8A, DISCONNECT 0x98,
HTTP 401/403 on ``/v1/devices/self``, a TLS alert against the certificate) is not
hammered: the agent waits a long, jittered time (or exits with ``EXIT_REFUSED`` when
asked to), and logs the server's reason. Only an operator can change that answer.

With an access token or a SAS token (``auth`` in agent.toml, ``tokens.py``) the
supervisor also owns the credential: a refusal that says the credential expired or was
revoked gets one fresh credential and an immediate reconnect before it counts as a
refusal of the device; DISCONNECT 0xA0 (the credential's connect time is up) and a
password credential reaching its refresh point reconnect at once with a new one; a
renewed certificate drops the token bound to the old certificate or key.

While no session is up, records wait in the buffer (oldest dropped beyond its capacity)
and are sent, oldest first, after reconnecting. Delivery is at least once.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from fleetward.agent.commands import (
    BadCommand,
    Command,
    CommandRunner,
    failed,
)
from fleetward.agent.connect import ChannelRefused, Outbound, Outcome, Session
from fleetward.agent.https_client import (
    DEFAULT_POLL_WAIT_SECONDS,
    HttpsSession,
    https_transport_factory,
)
from fleetward.agent.mqtt_client import (
    EnhancedAuthUnsupported,
    MqttSession,
    MqttSettings,
    mqtt_tls_context,
)
from fleetward.agent.renewal import (
    DEFAULT_RENEW_FRACTION,
    MAX_SLEEP_SECONDS,
    Agent,
    backoff_delay,
    next_renewal,
    open_agent,
    plan_retry,
    recover_interrupted,
    validate_fraction,
)
from fleetward.agent.state import AgentConfig, StateLayout, load_config, state_lock
from fleetward.agent.telemetry import (
    DEFAULT_MESSAGE_TYPE,
    OfflineBuffer,
    Record,
    Source,
    validate_interval,
    validate_message_type,
)
from fleetward.agent.tokens import (
    MAX_SAS_VALIDITY_SECONDS,
    SAS_VALIDITY_SECONDS,
    SasProvider,
    TokenProvider,
    make_credentials,
    resolve_binding,
)
from fleetward.clock import Clock, SystemClock
from fleetward.errors import FleetwardError, InvalidInput

log = structlog.get_logger("fleetward.agent")

EXIT_OK = 0
EXIT_REFUSED = 4  # --exit-on-refusal: the server refuses this identity (3 = enrollment pending)
CHANNELS = ("mqtt", "https")

# Reconnecting after a lost connection: full jitter in [0, min(cap, base·2^(n-1))].
RECONNECT_BASE_SECONDS = 1.0
RECONNECT_CAP_SECONDS = 300.0  # a fleet returning after an outage spreads over 5 minutes
# After a refusal of the identity: at least a minute, up to an hour: an operator has to
# act first, and a refused device that reconnects in a loop only fills the audit log.
REFUSAL_MIN_SECONDS = 60.0
REFUSAL_CAP_SECONDS = 3600.0
STABLE_SESSION_SECONDS = 30.0  # a session that lasted this long resets the backoff
SEND_BATCH = 20  # messages per send; paho's in-flight window
SEND_TIMEOUT_SECONDS = 30.0  # a batch not acknowledged by then: the session is dead
MAX_PENDING_RESULTS = 256  # command results waiting for a session; oldest dropped beyond
MAX_QUEUED_COMMANDS = 64  # received, not yet run; beyond, the server redelivers later
POLL_SECONDS = 0.2  # how often idle loops look at stop/renewal flags
# A session ended by DISCONNECT 0xA0, or because its password credential was due, is
# replaced at once, unless it lasted less than this: then something is wrong with the
# credential's lifetime or the clocks, and the usual backoff applies (no tight loop).
MIN_CREDENTIAL_SESSION_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Everything ``fleetward-agent run`` can be told (the MQTT URL lives in agent.toml)."""

    channel: str | None = None  # mqtt | https | None: mqtt for a key file, https for a token
    mqtt_version: str = "5"
    qos: int = 1
    keepalive_seconds: int = 60
    message_type: str = DEFAULT_MESSAGE_TYPE
    interval_seconds: float = 10.0
    count: int | None = None  # records to produce before exiting (once all are sent)
    buffer_max_records: int = 1000
    exit_on_refusal: bool = False
    renew: bool = True
    renew_fraction: float = DEFAULT_RENEW_FRACTION
    command_handler: Path | None = None
    handler_timeout_seconds: float = 60.0
    poll_wait_seconds: int = DEFAULT_POLL_WAIT_SECONDS
    reconnect_base_seconds: float = RECONNECT_BASE_SECONDS
    reconnect_cap_seconds: float = RECONNECT_CAP_SECONDS
    refusal_min_seconds: float = REFUSAL_MIN_SECONDS
    refusal_cap_seconds: float = REFUSAL_CAP_SECONDS
    connect_timeout_seconds: float = 30.0
    send_timeout_seconds: float = SEND_TIMEOUT_SECONDS
    sas_validity_seconds: int = SAS_VALIDITY_SECONDS  # auth = sas: each SAS token's life

    def __post_init__(self) -> None:
        if self.channel is not None and self.channel not in CHANNELS:
            raise InvalidInput(f"unknown channel {self.channel!r}", hint="use --mqtt or --https")
        validate_message_type(self.message_type)
        validate_interval(self.interval_seconds)
        validate_fraction(self.renew_fraction)
        if self.count is not None and self.count < 1:
            raise InvalidInput("--count must be at least 1", hint="leave it out to run forever")
        if self.buffer_max_records < 1:
            raise InvalidInput("--buffer-size must be at least 1", hint="e.g. --buffer-size 1000")
        if self.qos not in (0, 1):
            raise InvalidInput(f"QoS {self.qos} is not supported", hint="use --qos 0 or --qos 1")
        if not 1 <= self.sas_validity_seconds <= MAX_SAS_VALIDITY_SECONDS:
            raise InvalidInput(f"--sas-validity must be 1-{MAX_SAS_VALIDITY_SECONDS} seconds",
                               hint="the server refuses longer ones ([tokens] "
                                    "max_sas_validity_seconds); e.g. --sas-validity 3600")
        if not (0 < self.reconnect_base_seconds <= self.reconnect_cap_seconds
                and 0 < self.refusal_min_seconds <= self.refusal_cap_seconds):
            raise InvalidInput("backoff bounds must be positive with base <= cap")


@dataclass(slots=True)
class RunStats:
    """What a run did (returned by ``run_agent``; counters only grow)."""

    produced: int = 0  # records the source gave
    delivered: int = 0  # records the server acknowledged
    rejected: int = 0  # records the server refused (not resent)
    dropped: int = 0  # records dropped from the full offline buffer
    unsent: int = 0  # records still buffered when the run ended
    commands: int = 0  # command results the server acknowledged
    connections: int = 0  # sessions opened
    refusals: int = 0  # times the server refused this identity
    renewals: int = 0
    exit_code: int = EXIT_OK
    exit_reason: str = ""
    backoffs: list[float] = field(default_factory=list)  # seconds waited before reconnects


def pick_channel(requested: str | None, keystore_kind: str, *,
                 client_certificate: bool = True) -> str:
    """The channel to use: the requested one, or MQTT for a key file and HTTPS for a
    token key (MQTT cannot use a token key for TLS, see ``mqtt_client``). A session that
    presents no client certificate (a key-bound access token, SAS) can use either.

    Raises:
        InvalidInput: MQTT requested with a PKCS#11 key as the TLS client key.
    """
    if not client_certificate:
        return requested or "mqtt"
    if requested == "mqtt" and keystore_kind == "pkcs11":
        raise InvalidInput("--mqtt cannot use the device key on the PKCS#11 token: Python's "
                           "TLS (paho-mqtt) needs the private key in a file",
                           hint="use --https: the HTTPS channel uses the token through curl "
                                "and OpenSSL's pkcs11 engine")
    if requested is not None:
        return requested
    return "https" if keystore_kind == "pkcs11" else "mqtt"


def presents_certificate(config: AgentConfig, keystore_kind: str,
                         has_certificate: bool) -> bool:
    """Whether the channels present the client certificate: mTLS, or a token bound to
    the certificate (which is only good over a connection presenting it).

    Raises:
        AgentStateError: the mode needs what the state lacks.
    """
    if config.auth == "mtls":
        return True
    if config.auth == "sas":
        return False
    return resolve_binding(config, keystore_kind, has_certificate) == "certificate"


def reconnect_delay(failures: int, rng: random.Random, options: RunOptions) -> float:
    """Full jitter after ``failures`` consecutive failed or short sessions."""
    return backoff_delay(failures, rng, options.reconnect_base_seconds,
                         options.reconnect_cap_seconds)


def refusal_delay(refusals: int, rng: random.Random, options: RunOptions) -> float:
    """At least ``refusal_min_seconds``, plus full jitter growing to the cap."""
    return min(options.refusal_cap_seconds, options.refusal_min_seconds + backoff_delay(
        refusals, rng, options.refusal_min_seconds, options.refusal_cap_seconds))


class Supervisor:
    """One ``run``: see the module docstring. Build with ``run_agent``."""

    def __init__(self, agent: Agent, layout: StateLayout, options: RunOptions,
                 stop: threading.Event, *, source: Source | None, clock: Clock,
                 rng: random.Random, wait: Callable[[float], Any],
                 open_session: Callable[[Supervisor], Session] | None = None) -> None:
        self.agent = agent
        self.layout = layout
        self.options = options
        self.stop = stop
        self.source = source
        self.clock = clock
        self.rng = rng
        self.wait = wait
        self.stats = RunStats()
        self.buffer = OfflineBuffer(options.buffer_max_records)
        config = load_config(layout)
        self.auth = config.auth
        self.client_certificate = presents_certificate(config, agent.keystore.kind,
                                                       layout.cert.exists())
        self.channel = pick_channel(options.channel, agent.keystore.kind,
                                    client_certificate=self.client_certificate)
        self.mqtt = MqttSettings(url=config.effective_mqtt_url(), version=options.mqtt_version,
                                 qos=options.qos, keepalive_seconds=options.keepalive_seconds,
                                 connect_timeout_seconds=options.connect_timeout_seconds)
        self._open_session = open_session or Supervisor._default_session
        # Held while the certificate/key pair changes (renewal) and while a session loads
        # it: a session must never pair the new key with the old certificate.
        self.identity_lock = threading.Lock()
        self.credentials: TokenProvider | SasProvider | None = make_credentials(
            layout, config, agent.keystore, clock=clock, identity_lock=self.identity_lock,
            sas_validity_seconds=options.sas_validity_seconds)
        self._enhanced_auth = True  # FW-TOKEN until the server says it lacks it (0x8C)
        self.renewed = threading.Event()
        self.source_done = threading.Event()
        self._interval = options.interval_seconds
        self._commands: queue.Queue[Command | BadCommand] = queue.Queue(MAX_QUEUED_COMMANDS)
        self._results: collections.deque[Outbound] = collections.deque()
        self._results_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending_commands = 0  # queued or running
        self.runner = CommandRunner(device_id=agent.device_id, set_interval=self.set_interval,
                                    handler=options.command_handler,
                                    handler_timeout_seconds=options.handler_timeout_seconds,
                                    clock=clock)

    # --- telemetry ------------------------------------------------------------------------

    @property
    def interval_seconds(self) -> float:
        return self._interval

    def set_interval(self, seconds: float) -> float:
        """The ``set-interval`` command: the next reading comes ``seconds`` after the
        previous one."""
        self._interval = validate_interval(seconds)
        log.info("telemetry interval changed", interval_s=seconds)
        return self._interval

    def _produce(self) -> None:
        source = self.source
        if source is None:
            return
        count = self.options.count
        try:
            while not self.stop.is_set() and (count is None or self.stats.produced < count):
                started = time.monotonic()
                try:
                    record = source.read()
                except InvalidInput as exc:
                    log.warning("telemetry reading skipped", error=exc.message, hint=exc.hint)
                else:
                    if record is None:
                        log.info("telemetry source ended", produced=self.stats.produced)
                        return
                    self.buffer.put(record)
                    self.stats.produced += 1
                if source.paced and (count is None or self.stats.produced < count):
                    self._sleep_until(started)
        except Exception:
            log.exception("telemetry source failed")
        finally:
            self.source_done.set()
            self.buffer.wake()

    def _sleep_until(self, started: float) -> None:
        """Until ``started + interval``; the interval is read again on every slice, so
        set-interval applies to the wait in progress."""
        while not self.stop.is_set():
            remaining = started + self._interval - time.monotonic()
            if remaining <= 0:
                return
            self.stop.wait(min(remaining, POLL_SECONDS))

    # --- commands --------------------------------------------------------------------------

    def accept_command(self, item: Command | BadCommand) -> None:
        """The session's command sink (called on its network thread: never blocks)."""
        with self._pending_lock:
            self._pending_commands += 1
        try:
            self._commands.put_nowait(item)
        except queue.Full:
            with self._pending_lock:
                self._pending_commands -= 1
            log.warning("too many commands waiting; this one is dropped and will be "
                        "delivered again by the server",
                        command_id=getattr(item, "id", None))

    def _work_commands(self) -> None:
        while not self.stop.is_set():
            try:
                item = self._commands.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            try:
                if isinstance(item, BadCommand):
                    log.warning("malformed command", error=item.message,
                                command_id=item.command_id)
                    if item.command_id is None:
                        continue  # no id: nothing to answer to
                    self._push_result(Outbound.of_result(item.command_id,
                                                         failed(item.message)))
                else:
                    self._push_result(Outbound.of_result(item.id, self.runner.answer(item)))
            except Exception:
                log.exception("command handling failed")
            finally:
                with self._pending_lock:
                    self._pending_commands -= 1

    def _push_result(self, message: Outbound) -> None:
        with self._results_lock:
            self._results.append(message)
            while len(self._results) > MAX_PENDING_RESULTS:
                lost = self._results.popleft()
                log.warning("too many command results waiting for the server; dropping the "
                            "oldest", command_id=lost.name)
        self.buffer.wake()

    def _take_results(self) -> list[Outbound]:
        with self._results_lock:
            batch: list[Outbound] = []
            while self._results and len(batch) < SEND_BATCH:
                batch.append(self._results.popleft())
            return batch

    def _requeue_results(self, messages: list[Outbound]) -> None:
        with self._results_lock:
            self._results.extendleft(reversed(messages))

    # --- renewal ----------------------------------------------------------------------------

    def _renew_forever(self) -> None:
        """``Agent.run``'s schedule, with a reconnect after each renewal."""
        fraction = self.options.renew_fraction
        failures = 0
        last: dt.datetime | None = None
        while not self.stop.is_set():
            try:
                cert = self.agent.certificate()
                now = self.clock.now()
                due = next_renewal(cert.not_valid_before_utc, cert.not_valid_after_utc,
                                   fraction, last)
                if failures == 0 and now < due:
                    self.stop.wait(min((due - now).total_seconds(), MAX_SLEEP_SECONDS))
                    continue
                with self.identity_lock:
                    outcome = self.agent.renew(force=True, fraction=fraction)
            except FleetwardError as exc:
                failures += 1
                try:
                    not_after = self.agent.certificate().not_valid_after_utc
                except FleetwardError:
                    not_after = self.clock.now()
                plan = plan_retry(self.clock.now(), failures, not_after, self.rng)
                getattr(log, plan.level)("renewal failed", error=exc.message, hint=exc.hint,
                                         failures=failures, retry_in_s=round(plan.delay_seconds),
                                         note=plan.note)
                self.stop.wait(plan.delay_seconds)
                continue
            except Exception:
                log.exception("renewal failed unexpectedly")
                failures += 1
                self.stop.wait(60.0)
                continue
            failures = 0
            last = self.clock.now()
            self.stats.renewals += 1
            log.info("reconnecting with the renewed certificate",
                     not_after=outcome.certificate.not_valid_after_utc.isoformat())
            self.renewed.set()
            self.buffer.wake()

    # --- sessions ---------------------------------------------------------------------------

    def _default_session(self) -> Session:
        # The lock covers loading the certificate and key, not the (slow) connect.
        # The credential provider takes identity_lock itself: never call it under the lock.
        if self.channel == "mqtt":
            with self.identity_lock:
                context = mqtt_tls_context(self.layout, self.agent.keystore,
                                           client_certificate=self.client_certificate)
            mqtt_session = MqttSession(self.agent.device_id, self.mqtt, context,
                                       self.accept_command, credentials=self.credentials,
                                       enhanced_auth=self._enhanced_auth, clock=self.clock)
            mqtt_session.open(self.stop)
            return mqtt_session
        with self.identity_lock:
            factory = https_transport_factory(self.layout, self.agent.server_url,
                                              self.agent.keystore,
                                              client_certificate=self.client_certificate)
        credentials = self.credentials
        https_session = HttpsSession(factory, self.accept_command,
                                     poll_wait_seconds=self.options.poll_wait_seconds,
                                     authorize=credentials.http_headers if credentials else None)
        https_session.open(self.stop)
        return https_session

    def finished(self) -> bool:
        """The source is done and everything it produced, and every result, is sent."""
        if self.source is None or not self.source_done.is_set() or len(self.buffer):
            return False
        with self._results_lock:
            if self._results:
                return False
        with self._pending_lock:
            return self._pending_commands == 0

    def _serve(self, session: Session) -> str:
        """Send until the session ends; returns why: stop, finished, renewed, lost."""
        while True:
            if self.stop.is_set():
                return "stop"
            if self.renewed.is_set():
                self.renewed.clear()
                return "renewed"
            if session.lost:
                return "lost"
            # A password credential (MQTT 3.1.1 token, SAS) cannot be replaced in the
            # session: reconnect with a new one before the server ends it at expiry.
            if getattr(session, "credential_due", False):
                return "credential"
            results = self._take_results()
            if results:
                try:
                    outcomes = session.send(results, self.options.send_timeout_seconds)
                except Exception:
                    self._requeue_results(results)
                    raise
                unsent = [m for m, o in zip(results, outcomes, strict=True)
                          if o is Outcome.UNSENT]
                self.stats.commands += sum(o is Outcome.DELIVERED for o in outcomes)
                self._requeue_results(unsent)
                continue
            if self.finished():
                return "finished"
            records = self.buffer.take(SEND_BATCH, POLL_SECONDS)
            if not records:
                continue
            try:
                outcomes = session.send([Outbound.of_record(r) for r in records],
                                        self.options.send_timeout_seconds)
            except Exception:
                self.buffer.requeue(records)  # nothing is lost to a bug in a session
                raise
            unsent_records: list[Record] = []
            for record, outcome in zip(records, outcomes, strict=True):
                if outcome is Outcome.DELIVERED:
                    self.stats.delivered += 1
                elif outcome is Outcome.REJECTED:
                    self.stats.rejected += 1
                else:
                    unsent_records.append(record)
            self.buffer.requeue(unsent_records)

    def _current_serial(self) -> int | None:
        with contextlib.suppress(FleetwardError):
            return int(self.agent.certificate().serial_number)
        return None

    def run(self) -> RunStats:
        """Run until ``stop`` is set, the source is finished, or (with
        ``exit_on_refusal``) the server refuses this identity."""
        threads = [threading.Thread(target=self._produce, name="fleetward-agent-source",
                                    daemon=True),
                   threading.Thread(target=self._work_commands, name="fleetward-agent-commands",
                                    daemon=True)]
        if self.options.renew and self.layout.cert.exists():
            threads.append(threading.Thread(target=self._renew_forever, daemon=True,
                                            name="fleetward-agent-renewal"))
        for thread in threads:
            thread.start()
        log.info("agent running", device=self.agent.device_id, channel=self.channel,
                 auth=self.auth,
                 url=self.mqtt.url if self.channel == "mqtt" else self.agent.server_url)
        try:
            self._supervise()
        finally:
            self.stop.set()
            self.buffer.wake()
            for thread in threads[1:]:  # the source may block on stdin; never wait for it
                thread.join(5)
            self.stats.dropped = self.buffer.dropped
            self.stats.unsent = len(self.buffer)
            log.info("agent stopped", delivered=self.stats.delivered,
                     rejected=self.stats.rejected, dropped=self.stats.dropped,
                     unsent=self.stats.unsent, reason=self.stats.exit_reason or "stop")
        return self.stats

    def _supervise(self) -> None:
        failures = 0
        refusals = 0
        while not self.stop.is_set() and not self.finished():
            serial = self._current_serial()
            try:
                session = self._open_session(self)
            except ChannelRefused as exc:
                if self._fresh_credential(exc):
                    continue
                refusals += 1
                if self._refused(exc, refusals):
                    return
                continue
            except EnhancedAuthUnsupported as exc:
                # Once per run: the token goes in the password from now on.
                log.warning("the MQTT server does not support FW-TOKEN; sending the access "
                            "token as the password", error=exc.message)
                self._enhanced_auth = False
                continue
            except FleetwardError as exc:
                failures += 1
                self._back_off(reconnect_delay(failures, self.rng, self.options),
                               "cannot connect", exc)
                continue
            except Exception:
                # A bug or a library surprise must not end a device's only agent: log it
                # with its traceback and retry like any other failure.
                log.exception("unexpected error while connecting")
                failures += 1
                self._back_off(reconnect_delay(failures, self.rng, self.options),
                               "cannot connect", None)
                continue
            self.stats.connections += 1
            if self.credentials is not None:
                self.credentials.note_success()
            opened = time.monotonic()
            try:
                why = self._serve(session)
            except Exception:
                log.exception("unexpected error in the session")
                why = "lost"
            finally:
                session.close()
            lasted = time.monotonic() - opened
            if lasted >= STABLE_SESSION_SECONDS:
                failures = 0
                refusals = 0
            if why in ("stop", "finished"):
                self.stats.exit_reason = why
                return
            if why == "renewed":
                # Reconnect at once, with the new certificate (and a token bound to it or
                # to the new key: the old key is gone).
                if self.credentials is not None:
                    self.credentials.invalidate()
                continue
            if why == "credential" and lasted >= MIN_CREDENTIAL_SESSION_SECONDS:
                log.info("reconnecting with a new credential before the current one expires")
                continue
            if getattr(session, "credential_expired", False) and self.credentials is not None:
                self.credentials.invalidate()
                if lasted >= MIN_CREDENTIAL_SESSION_SECONDS:
                    continue  # not a failure: the credential's time was up
            refusal = session.refusal
            if refusal is not None and serial is not None and serial != self._current_serial():
                # The server ended a session of the certificate we just replaced (it
                # revokes superseded certificates): not a refusal of the device.
                log.info("session of the previous certificate ended; reconnecting",
                         reason=refusal.reason)
                continue
            if refusal is not None:
                if self._fresh_credential(refusal):
                    continue
                refusals += 1
                if self._refused(refusal, refusals):
                    return
                continue
            failures += 1
            self._back_off(reconnect_delay(failures, self.rng, self.options),
                           "connection lost", None)

    def _fresh_credential(self, exc: ChannelRefused) -> bool:
        """True when the refusal is about the credential and a new one is worth one
        immediate retry (``Credentials.note_refusal``)."""
        if self.credentials is None or not self.credentials.note_refusal(exc):
            return False
        log.info("the server refused the credential; retrying once with a new one",
                 reason=exc.reason or None)
        return True

    def _refused(self, exc: ChannelRefused, refusals: int) -> bool:
        """Handle a refusal of the identity; True when the run must end."""
        self.stats.refusals += 1
        if self.options.exit_on_refusal:
            log.error("the server refuses this device; exiting", error=exc.message,
                      reason=exc.reason or None, hint=exc.hint)
            self.stats.exit_code = EXIT_REFUSED
            self.stats.exit_reason = "refused"
            return True
        delay = refusal_delay(refusals, self.rng, self.options)
        log.error("the server refuses this device; waiting before trying again",
                  error=exc.message, reason=exc.reason or None, hint=exc.hint,
                  retry_in_s=round(delay))
        self._pause(delay)
        return False

    def _back_off(self, delay: float, what: str, exc: FleetwardError | None) -> None:
        if exc is not None:
            log.warning(what, error=exc.message, hint=exc.hint, retry_in_s=round(delay, 1),
                        buffered=len(self.buffer))
        else:
            log.warning(what, retry_in_s=round(delay, 1), buffered=len(self.buffer))
        self._pause(delay)

    def _pause(self, delay: float) -> None:
        self.stats.backoffs.append(delay)
        self.renewed.clear()  # the next session uses the current certificate anyway
        self.wait(delay)


def run_agent(layout: StateLayout, options: RunOptions, stop: threading.Event, *,
              source: Source | None = None, clock: Clock | None = None,
              rng: random.Random | None = None, wait: Callable[[float], Any] | None = None,
              open_session: Callable[[Supervisor], Session] | None = None) -> RunStats:
    """Run the agent for an enrolled state directory until ``stop`` is set, the source
    is finished (``--count``, end of stdin) or, with ``exit_on_refusal``, the server
    refuses the device.

    Args:
        layout: the state directory.
        options: what ``run`` was told.
        stop: set it (e.g. from a signal handler) to end the run cleanly.
        source: telemetry records; None: commands and renewal only.
        clock: "now" for renewal and command expiry (tests freeze it).
        rng: jitter source (tests seed it); default: the OS CSPRNG.
        wait: how to wait out a backoff (default ``stop.wait``).
        open_session: replaces the MQTT/HTTPS session factory (tests).

    Returns:
        What the run did; ``exit_code`` is ``EXIT_REFUSED`` after a refusal with
        ``exit_on_refusal``, else ``EXIT_OK``.

    Raises:
        AgentStateError: not enrolled, or the state is unusable.
        InvalidInput: the options do not fit this device (e.g. MQTT with a token key).
    """
    clock = clock or SystemClock()
    agent = open_agent(layout, clock=clock, sleep=stop.wait)
    # A misfit (MQTT with a PKCS#11 TLS key, a token without a key pair) fails before
    # any I/O.
    pick_channel(options.channel, agent.keystore.kind,
                 client_certificate=presents_certificate(load_config(layout),
                                                         agent.keystore.kind,
                                                         layout.cert.exists()))
    with state_lock(layout):
        # A renewal cut short (power loss) may have left the new key with the old
        # certificate; finish it before any session loads the pair.
        recover_interrupted(layout, agent.keystore)
    supervisor = Supervisor(agent, layout, options, stop, source=source, clock=clock,
                            rng=rng or random.SystemRandom(), wait=wait or stop.wait,
                            open_session=open_session)
    return supervisor.run()


__all__ = ["CHANNELS", "EXIT_OK", "EXIT_REFUSED", "RunOptions", "RunStats", "Supervisor",
           "pick_channel", "presents_certificate", "reconnect_delay", "refusal_delay",
           "run_agent"]
