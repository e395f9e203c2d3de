"""First enrollment: pin the CA, make a key, trade a bootstrap token for a certificate.

1. Explicit trust bootstrap (RFC 7030 §4.1.1): ``GET /cacerts`` without authenticating
   the server; accept the answer only if a CA in it has the SHA-256 fingerprint the
   operator gave (``select_trusted``). Nothing is written before this check passes.
2. Re-verify: the same request again with the pinned CA as the ONLY trust anchor, so the
   server's TLS certificate must chain to it (a man in the middle who relayed the first
   answer cannot complete this handshake).
3. Write ``ca.pem`` and ``agent.toml``, generate the key (file or token), and send
   ``simpleenroll`` with HTTP Basic ``device-id:token`` (RFC 7030 §3.2.3).
4. Check the issued certificate (our key, our name, issued by the pinned CA) and store it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography import x509

from fleetward.agent.errors import TrustBootstrapFailed
from fleetward.agent.est_client import (
    EstClient,
    build_csr,
    cert_fingerprint,
    certs_to_pem,
    check_issued,
    select_trusted,
)
from fleetward.agent.keystore import open_keystore
from fleetward.agent.renewal import Sleep, install_certificate
from fleetward.agent.state import (
    AgentConfig,
    KeystoreConfig,
    StateLayout,
    ensure_state_dir,
    generate_passphrase_file,
    load_config,
    read_secret_file,
    save_config,
    state_lock,
    validate_est_label,
    validate_server_url,
    write_atomic,
)
from fleetward.agent.transport import HttpxTransport, bootstrap_tls_context, client_tls_context
from fleetward.clock import Clock, SystemClock
from fleetward.errors import Conflict, FleetwardError, InvalidInput
from fleetward.model import validate_device_id

log = structlog.get_logger("fleetward.agent")


@dataclass(frozen=True, slots=True)
class Pkcs11Options:
    module: str
    token_label: str
    pin_file: Path


@dataclass(frozen=True, slots=True)
class EnrollOptions:
    server_url: str
    device_id: str
    token: str
    ca_fingerprint: bytes  # SHA-256 of the pinned CA certificate (DER)
    state_dir: Path
    est_label: str | None = None
    passphrase_file: Path | None = None  # file keystore: None = generate one in state_dir
    pkcs11: Pkcs11Options | None = None  # set: the key lives on this token


def fetch_pinned_trust(server_url: str, pinned: bytes, *, est_label: str | None,
                       clock: Clock) -> list[x509.Certificate]:
    """Steps 1 and 2 above: the CA certificates to trust, or an error (nothing written).

    Raises:
        TrustBootstrapFailed: no CA with the pinned fingerprint, or the server's TLS
            certificate does not chain to it.
        ServerUnreachable, ServerRefused: the server cannot be asked.
    """
    # The ONE request without server authentication (RFC 7030 §4.1.1 "explicit" TA).
    with contextlib.closing(HttpxTransport(server_url, bootstrap_tls_context())) as insecure:
        offered = EstClient(insecure, label=est_label).cacerts()
    trusted = select_trusted(offered, pinned, clock.now())
    context = client_tls_context(cadata=certs_to_pem(trusted).decode())
    with contextlib.closing(HttpxTransport(server_url, context)) as verified:
        again = EstClient(verified, label=est_label).cacerts()
    if {cert_fingerprint(c) for c in again} != {cert_fingerprint(c) for c in offered}:
        raise TrustBootstrapFailed(
            "the server's CA certificates changed between two requests",
            hint="retry; if it happens again, something is tampering with the connection")
    return trusted


def enroll(options: EnrollOptions, *, clock: Clock | None = None,
           sleep: Sleep = time.sleep) -> x509.Certificate:
    """Enroll this device into ``options.state_dir``; returns the issued certificate.

    Raises:
        InvalidInput: bad server URL, device id or label.
        Conflict: the state directory already holds a certificate.
        TrustBootstrapFailed: the server could not be authenticated (nothing written).
        ServerRefused: the server refused (e.g. a used or expired token).
        EnrollmentPending: still waiting for operator approval.
        KeyUnavailable, AgentStateError: the key, PIN or passphrase cannot be used.
    """
    clock = clock or SystemClock()
    server_url = validate_server_url(options.server_url)
    validate_device_id(options.device_id)
    if options.est_label is not None:
        validate_est_label(options.est_label)
    if not options.token.strip():
        raise InvalidInput("the bootstrap token is empty",
                           hint="pass it with --token-file or FLEETWARD_BOOTSTRAP_TOKEN")
    layout = StateLayout(options.state_dir)
    _refuse_if_enrolled(layout)
    # Unreadable secrets fail before the server is contacted (and before a token is used).
    if options.pkcs11 is not None:
        read_secret_file(options.pkcs11.pin_file, "PKCS#11 PIN")
    elif options.passphrase_file is not None:
        read_secret_file(options.passphrase_file, "key passphrase")

    trusted = fetch_pinned_trust(server_url, options.ca_fingerprint,
                                 est_label=options.est_label, clock=clock)

    ensure_state_dir(layout.root)
    with state_lock(layout):
        _refuse_if_enrolled(layout)
        _discard_interrupted(layout)
        write_atomic(layout.ca, certs_to_pem(trusted), 0o644)
        if options.pkcs11 is not None:
            keystore_config = KeystoreConfig(
                kind="pkcs11", module=options.pkcs11.module,
                token_label=options.pkcs11.token_label,
                pin_file=str(options.pkcs11.pin_file.resolve()))
        else:
            passphrase_file = options.passphrase_file or layout.passphrase
            if options.passphrase_file is None:
                generate_passphrase_file(layout.passphrase)
            keystore_config = KeystoreConfig(kind="file",
                                             passphrase_file=str(passphrase_file.resolve()))
        config = AgentConfig(server_url=server_url, device_id=options.device_id,
                             keystore=keystore_config, est_label=options.est_label)
        save_config(layout, config)
        keystore = open_keystore(layout, config)
        key = keystore.create_pending()
        context = client_tls_context(cadata=certs_to_pem(trusted).decode())
        try:
            with contextlib.closing(HttpxTransport(server_url, context)) as transport:
                client = EstClient(transport, label=options.est_label, sleep=sleep,
                                   now=clock.now)
                certs = client.simpleenroll(build_csr(options.device_id, key),
                                            options.device_id, options.token.strip())
            cert = check_issued(certs, device_id=options.device_id,
                                public_key=key.public_key(), trusted=trusted, now=clock.now())
        except BaseException:
            keystore.discard_pending()
            raise
        install_certificate(layout, keystore, cert, rotated=True)
    log.info("enrolled", device=options.device_id, serial=format(cert.serial_number, "x"))
    return cert


def _refuse_if_enrolled(layout: StateLayout) -> None:
    if layout.cert.exists() or layout.pending_cert.exists():
        raise Conflict(f"{layout.root} already holds this device's certificate",
                       hint="renew with `fleetward-agent renew`; to enroll afresh, use an "
                            "empty --state-dir")


def _discard_interrupted(layout: StateLayout) -> None:
    """Remove the key of an enrollment that stopped before its certificate arrived."""
    if not layout.config.exists():
        return
    try:
        previous = open_keystore(layout, load_config(layout))
        previous.discard_pending()
    except FleetwardError as exc:  # best effort: the old config may name a gone token
        log.warning("could not clean up an interrupted enrollment", error=exc.message)


__all__ = ["EnrollOptions", "Pkcs11Options", "enroll", "fetch_pinned_trust"]
