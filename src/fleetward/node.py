"""Building a running Fleetward from a data directory: ``initialise`` and ``Node``.

With ``server.py`` (its only importer) this is the composition root: the one place that
builds concrete stores and signers and wires the services together. It lives apart from
``server.py`` so that CLI commands that only talk to the admin API do not pay for
importing aiohttp, SQLAlchemy and Alembic.
"""


from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import ssl
import sys
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy.engine import make_url

from fleetward import ports
from fleetward.admin.app import AdminServices, build_admin_app
from fleetward.admin.auth import OperatorTokens
from fleetward.audit import AuditLog
from fleetward.ca import Authority
from fleetward.ca.setup import (
    ISSUING_NAME,
    ROOT_NAME,
    check_server_names,
    create_hierarchy,
    import_hierarchy,
    issue_server_certificate,
    load_handles,
)
from fleetward.clock import Clock, SystemClock
from fleetward.config import (
    IMPORT_PASSPHRASE_ENV,
    PIN_ENV,
    DataDirLayout,
    ListenerConfig,
    Settings,
    load_settings,
    render_settings,
)
from fleetward.crypto.kek import FileKek, KeyEncryptionKey, Pkcs11Kek
from fleetward.crypto.pkcs11 import Pkcs11Signer
from fleetward.crypto.signer import (
    PASSPHRASE_ENV,
    PASSPHRASE_FILE_ENV,
    FileSigner,
    Signer,
    generate_private_key,
    load_signer,
    write_encrypted_key,
    write_private_file,
)
from fleetward.crypto.x509util import load_certificate
from fleetward.datadir_secrets import audit_key, ca_passphrase, pkcs11_pin
from fleetward.edge.channel import LiveConnections, MessageSink
from fleetward.edge.credentials import PresentedCredentials
from fleetward.edge.device import build_device_app
from fleetward.edge.device_api import DeviceApi
from fleetward.edge.est import EstEndpoints
from fleetward.edge.gate import CacheUpdate, LocalChanges, TrustGate
from fleetward.edge.hooks import AuditWriter, ChannelHooks, Throttle, flush_last_seen
from fleetward.edge.ingest import Ingest
from fleetward.edge.mqtt.server import MqttServer
from fleetward.edge.oauth import TOKEN_PATH, OAuthEndpoints
from fleetward.edge.public import PublicEndpoints, build_public_app
from fleetward.edge.sinks import FanoutSink, NatsSink, SqlSink
from fleetward.enroll import BootstrapTokens, EnrollmentService
from fleetward.errors import ConfigurationError, FleetwardError, InvalidInput, KeyUnavailable
from fleetward.model import AuditEvent, DeviceType, Role
from fleetward.registry import Registry
from fleetward.registry.device_commands import DeviceCommandService, device_command_json
from fleetward.registry.policies import PolicyService
from fleetward.store import Database
from fleetward.store import cas as ca_rows
from fleetward.store import devices as device_rows
from fleetward.tokens.access import AccessTokenIssuer, AccessTokenVerifier
from fleetward.tokens.api_keys import ApiKeyService
from fleetward.tokens.assertion import AssertionVerifier
from fleetward.tokens.credentials import DeviceCredentialService, load_data_key
from fleetward.tokens.dpop import ProofVerifier
from fleetward.tokens.keys import SigningKeys
from fleetward.tokens.replay import ReplayCache
from fleetward.tokens.service import TokenService
from fleetward.web.request_errors import (
    loop_exception_handler,
    request_error_logger,
    scrub_foreign_record,
)
from fleetward.web.tls import server_context
from fleetward.web.tls_gate import GatedTLSSite, ListenerLimits

log = structlog.get_logger("fleetward.server")

DEFAULT_DEVICE_TYPE = "default"
CRL_CHECK_INTERVAL_SECONDS = 60
COMMAND_EXPIRY_SWEEP_SECONDS = 60  # undelivered commands past their TTL become expired
LAST_SEEN_FLUSH_SECONDS = 5  # devices.last_seen_at is written in batches this often
TOKEN_KEY_ROTATION_CHECK_SECONDS = 3600  # is the token signing key due for rotation?
OEM_TRUST_REFRESH_SECONDS = 5  # a newly registered OEM CA is trusted by TLS within this
_ANY_ADDRESS = ("0.0.0.0", "::", "")  # noqa: S104  (names, not a bind)


def configure_logging(level: str = "info") -> None:
    """JSON logs on stderr, one object per line, from structlog and from the standard
    ``logging`` module alike (aiohttp, asyncio, Alembic, warnings). The audit module strips
    secret-looking keys before logging; ``web.request_errors`` keeps raw request bytes
    out of records from aiohttp and asyncio."""
    stdlib = logging.StreamHandler(sys.stderr)
    stdlib.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True),
                           scrub_foreign_record],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()]))
    logging.basicConfig(level=level.upper(), handlers=[stdlib])
    logging.captureWarnings(True)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def write_admin_url(layout: DataDirLayout, listeners: ListenerConfig) -> None:
    """Where CLI commands on this host find the admin API. Loopback and wildcard binds are
    named ``localhost``, the name the server certificate always carries."""
    local = (*_ANY_ADDRESS, "127.0.0.1")
    host = "localhost" if listeners.host in local else listeners.host
    layout.admin_url_file.write_text(f"https://{host}:{listeners.admin_port}\n")


# --- init -----------------------------------------------------------------------------


def initialise(data_dir: Path, *, hostnames: list[str], organization: str,
               listeners: ListenerConfig, key_backend: str = "file",
               pkcs11_module: str = "", pkcs11_token_label: str = "",
               pkcs11_pin_file: str = "", import_ca_cert: Path | None = None,
               import_ca_key: Path | None = None, import_root_cert: Path | None = None,
               database_url: str = "", clock: Clock | None = None) -> bool:
    """Create a data directory; return False if it was already initialised.

    Raises:
        ConfigurationError: bad flags, unreadable import files, token problems.
    """
    clock = clock or SystemClock()
    layout = DataDirLayout(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    if layout.config_file.exists():
        settings = load_settings(data_dir)
        db = Database(settings.database_url)
        try:
            db.migrate()  # a newer Fleetward may bring new migrations
            with db.read() as conn:
                if ca_rows.get_ca(conn, ISSUING_NAME) is not None:
                    return False
        finally:
            db.dispose()
    for folder in (layout.keys, layout.secrets, layout.certs):
        folder.mkdir(mode=0o700, exist_ok=True)

    ca = replace(Settings(data_dir).ca, key_backend=key_backend, pkcs11_module=pkcs11_module,
                 pkcs11_token_label=pkcs11_token_label, pkcs11_pin_file=pkcs11_pin_file)
    settings = Settings(data_dir=data_dir, listeners=listeners, ca=ca)
    if database_url:
        # A URL with a password stays in FLEETWARD_DATABASE_URL, never in the config file.
        with_password = make_url(database_url).password is not None
        settings = replace(settings, database=replace(
            settings.database, url="" if with_password else database_url,
            url_from_env=with_password))
    _validate_names(organization, hostnames)
    external_passphrase = os.environ.get(PASSPHRASE_ENV) or os.environ.get(PASSPHRASE_FILE_ENV)
    if not external_passphrase and not layout.passphrase_file.exists():
        write_private_file(layout.passphrase_file, secrets.token_urlsafe(32).encode())
    if not layout.audit_key_file.exists():
        write_private_file(layout.audit_key_file, secrets.token_hex(32).encode())
    passphrase = ca_passphrase(layout)
    audit = AuditLog(audit_key(layout), clock)
    now = clock.now()

    db = Database(database_url or settings.database_url)
    try:
        db.migrate()
        with db.transaction() as conn:
            if import_ca_cert or import_ca_key:
                if not (import_ca_cert and import_ca_key and import_root_cert):
                    raise ConfigurationError(
                        "importing a CA needs --import-ca-cert, --import-ca-key and "
                        "--import-root-cert", hint="pass all three")
                root, issuing = _import(layout, import_ca_cert, import_ca_key, import_root_cert,
                                        passphrase, audit, conn, now)
            else:
                root_signer, issuing_signer = _new_ca_signers(layout, settings, passphrase)
                root, issuing = create_hierarchy(
                    conn, root_signer=root_signer, issuing_signer=issuing_signer,
                    organization=organization, root_validity_days=ca.root_validity_days,
                    issuing_validity_days=ca.issuing_validity_days,
                    public_url=listeners.public_url, now=now, audit=audit)
            authority = Authority({root.name: root, issuing.name: issuing}, ISSUING_NAME, ca,
                                  listeners.public_url, clock, audit)
            authority.refresh_crl(conn, ROOT_NAME)
            authority.refresh_crl(conn, ISSUING_NAME)
            record, server_key = issue_server_certificate(conn, authority, hostnames, "system")
            if device_rows.get_type(conn, DEFAULT_DEVICE_TYPE) is None:
                device_rows.insert_type(conn, DeviceType(
                    DEFAULT_DEVICE_TYPE, "Devices registered without a specific type"), now)
        write_encrypted_key(layout.server_key_file, server_key, passphrase)
        chain = authority.chain_pem()
        layout.server_cert_file.write_text(record.pem + issuing.pem)
        layout.chain_file.write_text(chain)
        (layout.certs / "root-ca.pem").write_text(root.pem)
        (layout.certs / "issuing-ca.pem").write_text(issuing.pem)
        tokens = OperatorTokens(db, audit, clock)
        token = tokens.create("initial-admin", Role.ADMIN, "system")
        write_private_file(layout.admin_token_file, token.encode())
        write_admin_url(layout, listeners)
        layout.config_file.write_text(render_settings(settings))
        os.chmod(layout.config_file, 0o600)
    finally:
        db.dispose()
    return True


# "<org> Issuing CA" must fit a 64-character CN (RFC 5280 Appendix A, ub-common-name).
MAX_ORGANIZATION_CHARS = 53


def _validate_names(organization: str, hostnames: list[str]) -> None:
    """Refuse names that would only fail later, half-way through creating the CA."""
    if not organization or len(organization) > MAX_ORGANIZATION_CHARS:
        raise InvalidInput(f"--organization must be 1-{MAX_ORGANIZATION_CHARS} characters",
                           hint="it becomes part of the CA names, which X.509 limits to 64")
    check_server_names(hostnames)


def _new_ca_signers(layout: DataDirLayout, settings: Settings,
                    passphrase: bytes) -> tuple[Signer, Signer]:
    ca = settings.ca
    if ca.key_backend == "file":
        return (FileSigner.create(layout.ca_key_file(ROOT_NAME), passphrase),
                FileSigner.create(layout.ca_key_file(ISSUING_NAME), passphrase))
    if ca.key_backend == "pkcs11":
        pin = pkcs11_pin(settings)
        if not (ca.pkcs11_module and ca.pkcs11_token_label and pin):
            raise ConfigurationError(
                "the pkcs11 backend needs --pkcs11-module, --pkcs11-token-label and a PIN",
                hint=f"give --pkcs11-pin-file or set {PIN_ENV}")
        return tuple(  # type: ignore[return-value]
            Pkcs11Signer.generate(module=ca.pkcs11_module, token_label=ca.pkcs11_token_label,
                                  key_label=f"fleetward-{name}-ca", pin=pin)
            for name in (ROOT_NAME, ISSUING_NAME))
    raise ConfigurationError(f"unknown key backend {ca.key_backend!r}",
                             hint="use --ca-key-backend file or pkcs11")


def _import(layout: DataDirLayout, cert_path: Path, key_path: Path, root_path: Path,
            passphrase: bytes, audit: AuditLog, conn: Any, now: Any) -> Any:
    try:
        issuing_cert = load_certificate(cert_path.read_bytes())
        root_cert = load_certificate(root_path.read_bytes())
        key_data = key_path.read_bytes()
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the CA to import: {exc}",
                                 hint="pass PEM or DER certificate files and a PEM key") from exc
    import_pass = os.environ.get(IMPORT_PASSPHRASE_ENV)
    try:
        key = serialization.load_pem_private_key(
            key_data, password=import_pass.encode() if import_pass else None)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"cannot load the CA key to import: {exc}",
                                 hint=f"set {IMPORT_PASSPHRASE_ENV} if the key is encrypted"
                                 ) from exc
    target = layout.ca_key_file(ISSUING_NAME)
    write_encrypted_key(target, key, passphrase)  # type: ignore[arg-type]
    signer = FileSigner.load(target, passphrase)
    return import_hierarchy(conn, issuing_cert=issuing_cert, issuing_signer=signer,
                            root_cert=root_cert, now=now, audit=audit)


# --- serve ----------------------------------------------------------------------------


class Node:
    """Everything a running server holds, built from a data directory."""

    def __init__(self, data_dir: Path, listeners: ListenerConfig | None = None,
                 clock: Clock | None = None) -> None:
        self.layout = DataDirLayout(data_dir)
        if not self.layout.config_file.exists():
            raise ConfigurationError(f"{data_dir} is not a Fleetward data directory",
                                     hint=f"run: fleetward init --data-dir {data_dir}")
        settings = load_settings(data_dir)
        if listeners is not None:
            settings = replace(settings, listeners=listeners)
        self.settings = settings
        self.clock = clock or SystemClock()
        self.passphrase = ca_passphrase(self.layout)
        self.audit = AuditLog(audit_key(self.layout), self.clock)
        self.db = Database(settings.database_url)
        self.db.migrate()
        pin = pkcs11_pin(settings)

        def open_signer(key_ref: Any) -> Signer | None:
            try:
                return load_signer(key_ref, self.passphrase, pin)
            except KeyUnavailable as exc:
                log.warning("CA key not available; continuing without it", reason=exc.message)
                return None
        with self.db.read() as conn:
            handles = load_handles(conn, open_signer)
        self.authority = Authority(handles, ISSUING_NAME, settings.ca,
                                   settings.listeners.public_url, self.clock, self.audit)
        self.registry = Registry(self.db, self.authority, self.audit, self.clock)
        self.tokens = OperatorTokens(self.db, self.audit, self.clock)
        self.bootstrap = BootstrapTokens(self.db, self.audit, self.clock)
        self.enrollment = EnrollmentService(self.db, self.registry, self.bootstrap, self.audit,
                                            self.clock, settings.enroll)
        self.policies = PolicyService(self.db, self.audit, self.clock)
        # One writer thread: SQL writes are serialised in-process and never block the loop.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetward-db")
        self.public_executor = ThreadPoolExecutor(max_workers=2,
                                                  thread_name_prefix="fleetward-public")
        # The control-plane change feed has a thread of its own: revocations must reach
        # live connections within a second however busy OCSP, CRL and long-polls keep
        # the read pool.
        self.feed_executor = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="fleetward-feed")
        # Long-poll re-reads use the read pool, never queueing behind the writer thread.
        self.commands = DeviceCommandService(self.db, self.audit, self.clock,
                                             settings.device_api, self.public_executor)
        self.live = LiveConnections()
        self.local_changes = LocalChanges()
        self.audit.on_append = self.local_changes.noted
        self.db.on_commit = self.local_changes.committed
        self.audit_writer = AuditWriter(self.db, self.audit, self.executor)
        self._pin = pin
        self._build_credentials()
        self.gate = TrustGate(self.db, [self.authority.issuing.certificate], self.policies,
                              self.live, settings.channel, self.clock, self.audit_writer.submit,
                              secrets=self.credentials,
                              token_keys_changed=self.signing_keys.reload,
                              max_sas_validity_seconds=settings.tokens.max_sas_validity_seconds)
        self.registry.credential_revoker = self.credentials.revoke_all_in
        self.token_service = TokenService(
            self.db, self.audit, self.clock, settings.tokens, self.gate, self.token_issuer,
            self.token_verifier, self.proofs, self.assertions, self.credentials.public_keys)
        self._trusted_oem: set[str] = set()

    def _build_credentials(self) -> None:
        """Token signing keys, verifiers, symmetric-key encryption and API keys."""
        settings = self.settings
        config = settings.tokens
        self.issuer = settings.issuer
        self.server_names = server_names(self.layout.server_cert_file, self.issuer)
        kek: KeyEncryptionKey
        if config.kek_backend == "pkcs11":
            ca = settings.ca
            if not (ca.pkcs11_module and ca.pkcs11_token_label and self._pin):
                raise ConfigurationError(
                    "[tokens] kek_backend = \"pkcs11\" needs the CA's PKCS#11 token",
                    hint="set [ca] pkcs11_module, pkcs11_token_label and the PIN, or use "
                         "kek_backend = \"file\"")
            kek = Pkcs11Kek.open_or_create(ca.pkcs11_module, ca.pkcs11_token_label, self._pin)
        else:
            kek = FileKek.load_or_create(self.layout.kek_file)
        self.credentials = DeviceCredentialService(
            self.db, self.audit, self.clock, load_data_key(self.db, kek, clock=self.clock))
        self.api_keys = ApiKeyService(self.db, self.audit, self.clock)
        self.signing_keys = SigningKeys(
            self.db, self.audit, self.clock, config,
            open_signer=lambda ref: load_signer(ref, self.passphrase, self._pin),
            new_signer=self._new_token_signer)
        self.signing_keys.load()
        self.replay = ReplayCache(config.replay_cache_entries)
        self.token_issuer = AccessTokenIssuer(self.signing_keys, self.issuer, self.issuer,
                                              config, self.clock)
        self.token_verifier = AccessTokenVerifier(self.signing_keys, self.issuer, self.issuer,
                                                  config, self.clock)
        self.proofs = ProofVerifier(self.replay, config, self.clock, self.server_names)
        # A client assertion's aud: the issuer or the token endpoint under any of our
        # names (RFC 7523 §3 point 3).
        port = settings.listeners.device_port
        audiences = {self.issuer, self.issuer + TOKEN_PATH}
        audiences |= {f"https://{_url_host(name)}:{port}{TOKEN_PATH}"
                      for name in self.server_names}
        self.assertions = AssertionVerifier(self.replay, config, self.clock,
                                            frozenset(audiences))

    def _new_token_signer(self, label: str) -> Signer:
        """A new token signing key where the CA's keys live ([ca] key_backend)."""
        ca = self.settings.ca
        if ca.key_backend == "pkcs11":
            if not (ca.pkcs11_module and ca.pkcs11_token_label and self._pin):
                raise ConfigurationError("the pkcs11 key backend needs its module, token "
                                         "label and PIN", hint=f"set {PIN_ENV}")
            return Pkcs11Signer.generate(module=ca.pkcs11_module,
                                         token_label=ca.pkcs11_token_label,
                                         key_label=f"fleetward-token-{label}", pin=self._pin)
        key = generate_private_key("ec-p256")
        path = self.layout.token_key_file(label)
        write_encrypted_key(path, key, self.passphrase)
        return FileSigner(key, path)

    def refresh_crls(self) -> list[str]:
        with self.db.transaction() as conn:
            return self.authority.refresh_due_crls(conn)

    def admin_app(self) -> web.Application:
        return build_admin_app(AdminServices(
            db=self.db, registry=self.registry, tokens=self.tokens, authority=self.authority,
            audit=self.audit, clock=self.clock, executor=self.executor,
            bootstrap=self.bootstrap, enrollment=self.enrollment, policies=self.policies,
            commands=self.commands, access_tokens=self.token_service,
            credentials=self.credentials, api_keys=self.api_keys,
            signing_keys=self.signing_keys))

    def public_app(self) -> web.Application:
        # Its own threads: OCSP signing and CRL reads must not queue behind admin writes
        # (and a flood of OCSP requests must not stall the admin API).
        return build_public_app(PublicEndpoints(self.db, self.authority, self.public_executor),
                                oauth=self.oauth_endpoints())

    def oauth_endpoints(self) -> OAuthEndpoints:
        return OAuthEndpoints(self.token_service, self.api_keys, self.signing_keys,
                              self.issuer, self.public_executor, self.audit_writer.submit,
                              Throttle(self.settings.channel.refusal_audit_window_seconds))

    def tls_context(self, *, device_clients: bool, require_client_cert: bool = False,
                    mqtt: bool = False) -> ssl.SSLContext:
        """Server TLS; the device listeners ask for client certificates (optional on
        HTTPS, where EST bootstrap enrollment has none; required on MQTT)."""
        ctx = server_context(self.layout.server_cert_file, self.layout.server_key_file,
                             self.passphrase,
                             client_ca_file=self.layout.chain_file if device_clients else None,
                             require_client_cert=require_client_cert)
        if mqtt or require_client_cert:
            return ctx  # MQTT: our CA chain only; OEM certificates only ever enroll
        if device_clients:
            # A registered OEM CA may be an intermediate of the manufacturer's hierarchy:
            # it is then the trust anchor for its IDevIDs (RFC 5280 §6.1.1 lets the
            # relying party choose anchors). Routes check which CA issued a certificate.
            ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
            self._trust_oem_cas(ctx)
        return ctx

    def _trust_oem_cas(self, ctx: ssl.SSLContext) -> int:
        """Add OEM CAs registered since the last call; returns how many were added.

        OpenSSL cannot drop a CA from a live context; an OEM CA is never unregistered,
        and EnrollmentService refuses IDevIDs whose issuer is not registered anyway.
        """
        added = 0
        for fingerprint, pem in self.enrollment.oem_ca_pems().items():
            if fingerprint not in self._trusted_oem:
                ctx.load_verify_locations(cadata=pem)
                self._trusted_oem.add(fingerprint)
                added += 1
        return added

    async def run(self, stop: asyncio.Event) -> None:
        listeners = self.settings.listeners
        runners: list[web.AppRunner] = []
        device_tls = self.tls_context(device_clients=True)
        sites: list[tuple[web.Application, int, ssl.SSLContext | None, str]] = [
            (self.public_app(), listeners.public_port, None, "public"),
            (self.admin_app(), listeners.admin_port, self.tls_context(device_clients=False),
             "admin"),
        ]
        loop = asyncio.get_running_loop()
        # asyncio's default handler logs reprs of handles (a callback's arguments: raw
        # request bytes), transports and protocols.
        loop.set_exception_handler(loop_exception_handler)

        tls_refusals = Throttle(self.settings.channel.refusal_audit_window_seconds)

        def refused(address: str, reason: str) -> None:
            # At most one row per peer and reason per window (a peer retrying with a bad
            # certificate must not write a row per handshake), off the loop, on the
            # writer thread, like every other audit write.
            if tls_refusals.allow((address.rsplit(":", 1)[0], reason)):
                loop.run_in_executor(self.executor, self.enrollment.audit_tls_refusal,
                                     address, reason)

        def device_listener_limited(address: str, limit: str, reset: int) -> None:
            self.audit_writer.submit(AuditEvent(
                action="device_api.connections_limited", actor=f"remote:{address}",
                target="listener:device", outcome="failure",
                details={"limit": limit, "reset": reset, "source": address}))
        # The caches must be loaded before the first device connects (until then the
        # gate refuses everyone with "server unavailable": fail closed).
        await loop.run_in_executor(self.public_executor, self.gate.load)
        sink = await self._message_sink()
        ingest = Ingest(sink, self.commands, self.settings.device_api,
                        self.gate.message_types_of, self.executor)
        def resend_open_commands(device_id: str) -> None:  # on the loop
            fetched = loop.run_in_executor(self.public_executor, self.commands.pending,
                                           device_id)

            def push(done: asyncio.Future[list[Any]]) -> None:
                if done.cancelled() or done.exception() is not None:
                    log.error("reading open commands failed", device_id=device_id,
                              error=repr(done.exception()))
                    return
                self._push_commands(mqtt_server, device_id,
                                    [device_command_json(row) for row in done.result()])
            fetched.add_done_callback(push)
        hooks = ChannelHooks(ingest.accept_publish, self.audit_writer, self.clock,
                             self.settings.channel.refusal_audit_window_seconds,
                             resend_open_commands)
        presented = PresentedCredentials(self.gate, self.token_verifier, self.proofs,
                                         listeners.mqtt_port)
        mqtt_server = MqttServer(
            self.gate, self.live, hooks, self.settings.mqtt,
            self.tls_context(device_clients=True, mqtt=True, require_client_cert=(
                self.settings.mqtt.client_certificate == "required")),
            self.clock, credentials=presented)
        device_app = build_device_app(
            EstEndpoints(self.enrollment, self.executor, self.gate),
            DeviceApi(self.gate, self.live, ingest, self.commands, self.settings.device_api,
                      self.executor, credentials=presented),
            oauth=self.oauth_endpoints())
        sites.append((device_app, listeners.device_port, device_tls, "device"))

        def command_queued(device_id: str, command: dict[str, Any]) -> None:
            # Called on the committing (writer) thread; MQTT state lives on the loop.
            loop.call_soon_threadsafe(self._push_commands, mqtt_server, device_id, [command])
        self.commands.add_listener(command_queued)
        try:
            try:
                await mqtt_server.start(listeners.host, listeners.mqtt_port)
            except OSError as exc:  # taken since serve() checked it
                raise ports.bind_failed(ports.port_of(listeners, "mqtt"), exc) from None
            log.info("listening", listener="mqtt", host=listeners.host,
                     port=listeners.mqtt_port, tls=True)
            for app, port, ssl_ctx, name in sites:
                # aiohttp's default keep-alive (3630 s, started at connection_made)
                # would let certificate-less clients hold device slots for an hour; the
                # other listeners get aiohttp's former default, 75 s.
                # Malformed requests: one structured line without the request's bytes
                # (aiohttp's own logger printed the raw header in a traceback).
                runner = web.AppRunner(
                    app, access_log=None, logger=request_error_logger(name),
                    keepalive_timeout=(float(self.settings.device_api.idle_timeout_seconds)
                                       if name == "device" else 75.0))
                await runner.setup()
                runners.append(runner)
                site: web.BaseSite
                if name == "device":
                    device_api = self.settings.device_api
                    site = GatedTLSSite(
                        runner, listeners.host, port, ssl_context=device_tls,
                        on_refused=refused, on_limited=device_listener_limited,
                        limits=ListenerLimits(device_api.max_connections,
                                              device_api.max_pending_handshakes,
                                              device_api.max_pending_handshakes_per_source))
                else:
                    site = web.TCPSite(runner, listeners.host, port, ssl_context=ssl_ctx)
                try:
                    await site.start()
                except OSError as exc:
                    raise ports.bind_failed(ports.port_of(listeners, name), exc) from None
                log.info("listening", listener=name, host=listeners.host, port=port,
                         tls=ssl_ctx is not None)
            # CLI commands on this host find the admin API through this file.
            write_admin_url(self.layout, listeners)
            tasks = self._background_jobs(stop, device_tls)
            tasks.append(asyncio.create_task(self._watch_control_plane(stop, self.gate)))
            tasks.append(asyncio.create_task(self._every(
                stop, LAST_SEEN_FLUSH_SECONDS, "last-seen", self.executor,
                lambda: flush_last_seen(self.db, hooks.take_last_seen()))))
            await stop.wait()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            await mqtt_server.stop()
            await sink.close()
            for runner in runners:
                await runner.cleanup()
            self.executor.shutdown(wait=True)
            self.public_executor.shutdown(wait=True)
            self.feed_executor.shutdown(wait=True)
            self.db.dispose()

    async def _message_sink(self) -> MessageSink:
        """The configured sinks ([sinks]): the SQL table, NATS JetStream, or both."""
        config = self.settings.sinks
        sinks: list[MessageSink] = []
        if config.sql:
            sinks.append(SqlSink(self.db, self.executor, config))
        if config.nats_url:
            nats = NatsSink(config.nats_url, config)
            await nats.start()
            sinks.append(nats)
        # FanoutSink refuses an empty list with the configuration hint.
        return sinks[0] if len(sinks) == 1 else FanoutSink(sinks)

    def _push_commands(self, mqtt_server: MqttServer, device_id: str,
                       commands: list[dict[str, Any]]) -> None:
        """Deliver commands to the device's MQTT session, if it has one subscribed (on
        the loop), and record the deliveries in one transaction; long-polling HTTPS
        devices are woken by the command service instead."""
        delivered = [command["id"] for command in commands
                     if mqtt_server.deliver(f"devices/{device_id}/commands/{command['name']}",
                                            json.dumps(command).encode(), qos=1)]
        if not delivered:
            return

        def recorded(done: Future[int]) -> None:
            if done.exception() is not None:
                log.error("recording command deliveries failed", device_id=device_id,
                          commands=delivered, error=repr(done.exception()))
        self.executor.submit(self.commands.mark_delivered, delivered).add_done_callback(
            recorded)

    async def _watch_control_plane(self, stop: asyncio.Event, gate: TrustGate) -> None:
        """Apply control-plane changes (from any node) to the caches and live connections.

        Reads run on a worker thread, or on the committing thread right after this
        node's own watched changes (``LocalChanges``); ``apply`` always runs here, on
        the loop that owns the connections, in the order the updates were read. A
        failed read is logged and retried: the caches keep their last state
        (revocations already applied stay applied).
        """
        loop = asyncio.get_running_loop()
        interval = self.settings.channel.change_poll_ms / 1000

        def schedule(update: CacheUpdate) -> None:
            loop.call_soon_threadsafe(gate.apply, update)

        def poll_now() -> None:  # on the committing thread
            try:
                gate.poll_and_schedule(schedule)
            except Exception:
                log.exception("control-plane poll after a local change failed")
        self.local_changes.bind(poll_now)
        try:
            while not stop.is_set():
                try:
                    await loop.run_in_executor(self.feed_executor, gate.poll_and_schedule,
                                               schedule)
                    gate.close_expired()
                except FleetwardError as exc:
                    log.error("control-plane watch failed", error=exc.message)
                except Exception:
                    log.exception("control-plane watch failed unexpectedly")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            self.local_changes.bind(None)

    async def _every(self, stop: asyncio.Event, seconds: float, name: str,
                     executor: ThreadPoolExecutor, job: Callable[[], Any]) -> None:
        """Run ``job`` on ``executor`` every ``seconds`` until ``stop``.

        The loop must outlive any one failure: a dead CRL refresher lets CRLs expire, a
        dead sweeper leaves superseded certificates valid.
        """
        while not stop.is_set():
            try:
                await asyncio.get_running_loop().run_in_executor(executor, job)
            except FleetwardError as exc:
                log.error("periodic job failed", job=name, error=exc.message)
            except Exception:
                log.exception("periodic job failed unexpectedly", job=name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)

    def _background_jobs(self, stop: asyncio.Event,
                         device_tls: ssl.SSLContext) -> list[asyncio.Task[None]]:
        def refresh_crls() -> None:
            refreshed = self.refresh_crls()
            if refreshed:
                log.info("crls refreshed", cas=refreshed)

        def trust_oem_cas() -> None:
            if added := self._trust_oem_cas(device_tls):
                log.info("device listener trusts new OEM CAs", count=added)

        # SQL writes stay on the one writer thread; the OEM-CA read uses the public pool.
        jobs: list[tuple[float, str, ThreadPoolExecutor, Callable[[], Any]]] = [
            (CRL_CHECK_INTERVAL_SECONDS, "crl-refresh", self.executor, refresh_crls),
            (self.settings.enroll.supersede_sweep_seconds, "supersede-sweep", self.executor,
             self.enrollment.sweep_superseded),
            (COMMAND_EXPIRY_SWEEP_SECONDS, "command-expiry", self.executor,
             self.commands.expire_due),
            (OEM_TRUST_REFRESH_SECONDS, "oem-trust", self.public_executor, trust_oem_cas),
            (TOKEN_KEY_ROTATION_CHECK_SECONDS, "token-key-rotation", self.executor,
             self.signing_keys.rotate_if_due)]
        return [asyncio.create_task(self._every(stop, seconds, name, executor, job))
                for seconds, name, executor, job in jobs]


def server_names(server_cert_file: Path, issuer: str) -> frozenset[str]:
    """The host names and addresses devices reach this server by: the TLS server
    certificate's SANs and the issuer's host (what a proof's htu may name)."""
    names = {"localhost"}
    issuer_host = urllib.parse.urlsplit(issuer).hostname
    if issuer_host:
        names.add(issuer_host.lower())
    cert = x509.load_pem_x509_certificate(server_cert_file.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset(names)
    names |= {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    names |= {str(address) for address in san.get_values_for_type(x509.IPAddress)}
    return frozenset(names)


def _url_host(name: str) -> str:
    return f"[{name}]" if ":" in name else name


def serve(data_dir: Path, listeners: ListenerConfig | None) -> None:
    """Run every listener until SIGINT or SIGTERM.

    Every port is bound and released before anything else happens (no secret read, no
    migration, no file written, no listener started), so a port held by another process,
    a second ``serve`` included, ends start-up with one error that names its holder.

    Raises:
        ConfigurationError: not a data directory, a port is held or cannot be bound
            (``ports.PortInUse``), secrets or CA keys are missing.
    """
    if DataDirLayout(data_dir).config_file.exists():  # otherwise Node says to run init
        ports.check_free(ports.ports_of(listeners or load_settings(data_dir).listeners))
    node = Node(data_dir, listeners)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await node.run(stop)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
