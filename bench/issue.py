"""Issuance throughput: CSR in, certificate stored and audited, against raw signing.

The pipeline figure goes through ``Registry.issue_certificate`` exactly as the admin API
calls it (minus HTTP): the CSR arrives as PEM bytes, is parsed, its signature, key and
names are checked, the certificate is signed by the issuing CA with a ``FileSigner``
(P-256), and it is stored with its audit events in a real SQLite file in WAL mode, one
transaction per certificate. Each certificate is the first one of a freshly registered
device, so the transaction also moves the device to ``active`` (a second audit event).

The baseline, measured in the same run, is raw cryptography: a ``CertificateBuilder``
with the same issuer name, the same extensions in the same order and a P-256 key, signed,
with no parsing and no database. The ratio shows what the checks and the storage cost.

Device keys, devices and CSRs are made before the clock starts: a CSR is the device's
cost, not ours. Both loops are warmed up first. Figures are per wall-clock second and
per process-CPU-second (SQLite runs in this process, so its CPU time is included).

Usage:
    python bench/issue.py [--count N] [--baseline-count N] [--data-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cryptography
import structlog
from cryptography import x509
from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    NameOID,
)
from sqlalchemy import func, select

from fleetward.audit import AuditLog
from fleetward.ca import Authority
from fleetward.ca.setup import ISSUING_NAME, ROOT_NAME, create_hierarchy
from fleetward.clock import SystemClock
from fleetward.config import CAConfig
from fleetward.crypto.signer import FileSigner
from fleetward.model import DeviceType, device_uri
from fleetward.node import configure_logging
from fleetward.registry import Registry
from fleetward.store import Database
from fleetward.store import devices as device_rows
from fleetward.store.schema import audit_events, certificates

PUBLIC_URL = "http://127.0.0.1:8080"  # only ends up inside CDP/AIA URIs
DEVICE_TYPE = "sensor"
PROFILE = "device"
ACTOR = "operator:bench"
DB_FILE = "fleetward.db"


@dataclass(frozen=True, slots=True)
class Measurement:
    count: int
    wall_seconds: float
    cpu_seconds: float

    @property
    def per_wall_second(self) -> float:
        return self.count / self.wall_seconds

    @property
    def per_cpu_second(self) -> float:
        return self.count / self.cpu_seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "wall_seconds": round(self.wall_seconds, 6),
            "cpu_seconds": round(self.cpu_seconds, 6),
            "certs_per_second_wall": round(self.per_wall_second, 1),
            "certs_per_cpu_second": round(self.per_cpu_second, 1),
            "microseconds_per_cert_wall": round(1e6 * self.wall_seconds / self.count, 1),
        }


def measure(work: Callable[[int], object], count: int) -> Measurement:
    """Run ``work(i)`` for i in range(count) and time the whole loop, wall and CPU."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(count):
        work(i)
    wall1, cpu1 = time.perf_counter(), time.process_time()
    # process_time has a coarse tick on some kernels; never divide by zero on tiny runs.
    return Measurement(count, wall1 - wall0, max(cpu1 - cpu0, 1e-9))


# --- the pipeline -----------------------------------------------------------------------


@dataclass
class Pipeline:
    db: Database
    audit: AuditLog
    authority: Authority
    registry: Registry


def build_pipeline(data_dir: Path) -> Pipeline:
    """Wire the CA, the audit log and the registry over a SQLite file, as `fleetward init` does."""
    clock = SystemClock()
    db = Database(f"sqlite:///{data_dir / DB_FILE}")
    db.migrate()
    audit = AuditLog(secrets.token_bytes(32), clock)
    passphrase = secrets.token_urlsafe(24).encode()
    root_signer = FileSigner.create(data_dir / "root-ca.key", passphrase)
    issuing_signer = FileSigner.create(data_dir / "issuing-ca.key", passphrase)
    config = CAConfig()
    with db.transaction() as conn:
        root, issuing = create_hierarchy(
            conn,
            root_signer=root_signer,
            issuing_signer=issuing_signer,
            organization="Fleetward bench",
            root_validity_days=config.root_validity_days,
            issuing_validity_days=config.issuing_validity_days,
            public_url=PUBLIC_URL,
            now=clock.now(),
            audit=audit,
        )
        authority = Authority(
            {ROOT_NAME: root, ISSUING_NAME: issuing},
            ISSUING_NAME,
            config,
            PUBLIC_URL,
            clock,
            audit,
        )
        authority.refresh_crl(conn, ROOT_NAME)
        authority.refresh_crl(conn, ISSUING_NAME)
        device_rows.insert_type(conn, DeviceType(DEVICE_TYPE, "bench devices"), clock.now())
    with db.read() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    if str(mode).lower() != "wal":
        raise SystemExit(f"bench: SQLite is in journal mode {mode!r}, not WAL")
    return Pipeline(db, audit, authority, Registry(db, authority, audit, clock))


def make_csrs(registry: Registry, prefix: str, count: int) -> list[tuple[str, bytes]]:
    """Register ``count`` devices and make one P-256 CSR (PEM, CN = device id) for each."""
    out = []
    for i in range(count):
        device_id = f"{prefix}-{i:06d}"
        registry.create_device(device_id, DEVICE_TYPE, "bench", {}, ACTOR)
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(key, hashes.SHA256())
        )
        out.append((device_id, csr.public_bytes(serialization.Encoding.PEM)))
    return out


def run_pipeline(pipeline: Pipeline, count: int, warmup: int) -> Measurement:
    warm = make_csrs(pipeline.registry, "warmup", warmup)
    timed = make_csrs(pipeline.registry, "bench", count)
    issue = pipeline.registry.issue_certificate
    for device_id, csr_pem in warm:
        issue(device_id, csr_pem, PROFILE, ACTOR)
    return measure(lambda i: issue(timed[i][0], timed[i][1], PROFILE, ACTOR), count)


# --- the baseline -----------------------------------------------------------------------


def baseline_signer(
    issuer: x509.Certificate,
) -> Callable[[ec.EllipticCurvePublicKey], x509.Certificate]:
    """Raw cryptography: the device certificate the pipeline makes, built and signed directly.

    Same issuer name, subject shape, validity, extensions (order and criticality) and
    signature algorithm as the pipeline's certificate; a fresh P-256 CA key; nothing else.
    """
    ca_key = ec.generate_private_key(ec.SECP256R1())
    issuer_name = issuer.subject
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    cdp = x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(f"{PUBLIC_URL}/crl/{ISSUING_NAME}.crl")],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )
    aia = x509.AuthorityInformationAccess(
        [
            x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP,
                x509.UniformResourceIdentifier(f"{PUBLIC_URL}/ocsp"),
            ),
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS,
                x509.UniformResourceIdentifier(f"{PUBLIC_URL}/ca/{ISSUING_NAME}.der"),
            ),
        ]
    )
    key_usage = x509.KeyUsage(
        digital_signature=True,
        key_encipherment=False,
        content_commitment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    basic = x509.BasicConstraints(ca=False, path_length=None)
    counter = iter(range(1 << 62))

    def sign(public_key: ec.EllipticCurvePublicKey) -> x509.Certificate:
        device_id = f"bench-{next(counter):06d}"
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(issuer_name)
            .public_key(public_key)
            .serial_number(secrets.randbits(128) | 1)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(device_uri(device_id))]
                ),
                critical=False,
            )
            .add_extension(basic, critical=True)
            .add_extension(key_usage, critical=True)
            .add_extension(eku, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(aki, critical=False)
            .add_extension(cdp, critical=False)
            .add_extension(aia, critical=False)
            .sign(ca_key, hashes.SHA256())
        )

    return sign


def run_baseline(
    issuer: x509.Certificate, count: int, warmup: int
) -> tuple[Measurement, x509.Certificate]:
    sign = baseline_signer(issuer)
    keys = [ec.generate_private_key(ec.SECP256R1()).public_key() for _ in range(count + warmup)]
    sample = sign(keys[0])
    for key in keys[1 : warmup + 1]:
        sign(key)
    timed = keys[warmup:]
    return measure(lambda i: sign(timed[i]), count), sample


# --- honesty checks (outside the timed regions) -----------------------------------------


def shape(cert: x509.Certificate) -> tuple[object, ...]:
    return (
        cert.issuer,
        cert.signature_hash_algorithm.name if cert.signature_hash_algorithm else None,
        getattr(getattr(cert.public_key(), "curve", None), "name", None),
        [(e.oid.dotted_string, e.critical) for e in cert.extensions],
        cert.not_valid_after_utc - cert.not_valid_before_utc,
    )


def check_run(pipeline: Pipeline, issued: int, baseline_sample: x509.Certificate) -> dict[str, Any]:
    """Fail loudly if the pipeline did not store what it claims or the baseline drifted."""
    with pipeline.db.read() as conn:
        stored = conn.execute(
            select(func.count()).select_from(certificates).where(certificates.c.profile == PROFILE)
        ).scalar_one()
        events = conn.execute(
            select(func.count())
            .select_from(audit_events)
            .where(audit_events.c.action == "certificate.issued")
        ).scalar_one()
        report = pipeline.audit.verify(conn)
        last_pem = conn.execute(
            select(certificates.c.pem)
            .where(certificates.c.profile == PROFILE)
            .order_by(certificates.c.issued_at.desc())
            .limit(1)
        ).scalar_one()
    problems = []
    if stored != issued:
        problems.append(f"{stored} device certificates stored, {issued} issued")
    if events != issued:
        problems.append(f"{events} certificate.issued audit events, {issued} issued")
    if not report.ok:
        problems.append(f"audit chain does not verify: {report.to_json()}")
    ours = x509.load_pem_x509_certificate(last_pem.encode())
    if shape(ours) != shape(baseline_sample):
        problems.append(
            "baseline certificate differs from the pipeline's:\n"
            f"  pipeline {shape(ours)}\n  baseline {shape(baseline_sample)}"
        )
    if problems:
        raise SystemExit("bench: run is not valid:\n" + "\n".join(problems))
    return {
        "certificates_stored": stored,
        "issued_audit_events": events,
        "audit_chain_ok": report.ok,
    }


# --- output -------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "cryptography_openssl": openssl_backend.openssl_version_text(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def render_text(pipe: Measurement, base: Measurement, env: dict[str, Any]) -> str:
    ratio = pipe.per_wall_second / base.per_wall_second
    return "\n".join(
        [
            f"env: python {env['python']}, cryptography {env['cryptography']} "
            f"({env['cryptography_openssl']}), {env['cpus']} CPUs",
            f"pipeline: {pipe.per_wall_second:.0f} certs/s (wall), "
            f"{pipe.per_cpu_second:.0f} certs/CPU-s  "
            f"[N={pipe.count}, SQLite WAL, P-256, CSR -> stored + audited]",
            f"baseline: {base.per_wall_second:.0f} certs/s raw cryptography signing (wall), "
            f"{base.per_cpu_second:.0f} certs/CPU-s  [N={base.count}, P-256, no DB]",
            f"ratio pipeline/baseline: {ratio:.2f}",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=2000, help="timed pipeline issuances")
    parser.add_argument("--baseline-count", type=int, default=2000, help="timed raw signings")
    parser.add_argument("--warmup", type=int, default=100, help="untimed runs before each loop")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the SQLite file and CA keys go (default: a temp dir, removed)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    if args.count < 1 or args.baseline_count < 1 or args.warmup < 1:
        parser.error("--count, --baseline-count and --warmup must be at least 1")
    return args


def run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    if (data_dir / DB_FILE).exists():
        raise SystemExit(f"bench: {data_dir / DB_FILE} exists; give an empty --data-dir")
    data_dir.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(data_dir)
    try:
        pipe = run_pipeline(pipeline, args.count, args.warmup)
        issuer = pipeline.authority.issuing.certificate
        base, sample = run_baseline(issuer, args.baseline_count, args.warmup)
        checks = check_run(pipeline, args.count + args.warmup, sample)
    finally:
        pipeline.db.dispose()
    return {"pipeline": pipe, "baseline": base, "checks": checks}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The server's logging setup (JSON per audit event), rendered into /dev/null: its cost
    # stays in the figures without flooding the terminal.
    configure_logging("info")
    with open(os.devnull, "w") as sink:
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(sink))
        if args.data_dir is not None:
            result = run(args, args.data_dir)
        else:
            with tempfile.TemporaryDirectory(prefix="fleetward-bench-") as tmp:
                result = run(args, Path(tmp))
    pipe, base = result["pipeline"], result["baseline"]
    env = environment()
    if args.json:
        print(
            json.dumps(
                {
                    "pipeline": pipe.to_json() | {"database": "sqlite-wal", "key": "P-256"},
                    "baseline": base.to_json(),
                    "ratio_wall": round(pipe.per_wall_second / base.per_wall_second, 4),
                    "ratio_cpu": round(pipe.per_cpu_second / base.per_cpu_second, 4),
                    "checks": result["checks"],
                    "environment": env,
                },
                indent=2,
            )
        )
    else:
        print(render_text(pipe, base, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
