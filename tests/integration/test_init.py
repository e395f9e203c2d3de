"""`fleetward init`: once and idempotent, private files 0600, SANs, CA import, offline root."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
from alembic.script import ScriptDirectory
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import create_engine, text

from fleetward.store.db import MIGRATIONS_DIR
from tests.conftest import FLEETWARD, start_server, stop_server

PRIVATE_FILES = ["secrets/admin-token", "secrets/audit.key", "secrets/ca-passphrase",
                 "keys/root-ca.key", "keys/issuing-ca.key", "keys/server.key", "fleetward.toml"]


def run_init(data_dir: Path, *args: str, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLEETWARD, "init", "--data-dir", str(data_dir), *args],
                          capture_output=True, text=True, timeout=120, check=check,
                          env=env or dict(os.environ))


def snapshot(data_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data_dir)): p.read_bytes()
            for p in sorted(data_dir.rglob("*")) if p.is_file() and "fleetward.db" not in p.name}


def test_init_creates_everything_once_with_private_permissions(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = run_init(data_dir, "--hostname", "fleet.example.com", "--hostname", "10.0.0.7")
    assert "initialised" in first.stdout
    for name in PRIVATE_FILES:
        mode = stat.S_IMODE((data_dir / name).stat().st_mode)
        assert mode == 0o600, f"{name} is {oct(mode)}"
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    before = snapshot(data_dir)

    second = run_init(data_dir, "--hostname", "other.example.com")
    assert "already initialised" in second.stdout
    assert snapshot(data_dir) == before  # nothing regenerated, no key replaced

    server_cert = x509.load_pem_x509_certificates((data_dir / "certs/server.pem").read_bytes())[0]
    san = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "fleet.example.com"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1", "::1", "10.0.0.7"}
    root, issuing = (x509.load_pem_x509_certificate((data_dir / f"certs/{n}-ca.pem").read_bytes())
                     for n in ("root", "issuing"))
    issuing.verify_directly_issued_by(root)
    server_cert.verify_directly_issued_by(issuing)
    assert issuing.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    # Keys are encrypted PKCS#8: unreadable without the passphrase.
    key_pem = (data_dir / "keys/issuing-ca.key").read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in key_pem
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(key_pem, password=None)


def test_passphrase_from_environment_is_not_written_to_disk(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = dict(os.environ, FLEETWARD_CA_PASSPHRASE="correct horse battery staple")
    run_init(data_dir, env=env)
    assert not (data_dir / "secrets/ca-passphrase").exists()
    key = serialization.load_pem_private_key((data_dir / "keys/issuing-ca.key").read_bytes(),
                                             password=b"correct horse battery staple")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert b"correct horse battery staple" not in path.read_bytes(), path


def test_serve_without_the_passphrase_fails_with_a_hint(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = dict(os.environ, FLEETWARD_CA_PASSPHRASE="only-in-the-environment")
    run_init(data_dir, env=env)
    bare = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWARD_")}
    result = subprocess.run([*FLEETWARD, "serve", "--data-dir", str(data_dir)], env=bare,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no CA passphrase" in result.stderr and "FLEETWARD_CA_PASSPHRASE" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_a_directory_that_was_never_initialised_says_how(tmp_path: Path) -> None:
    result = subprocess.run([*FLEETWARD, "serve", "--data-dir", str(tmp_path / "nothing")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "fleetward init" in result.stderr


def _make_external_ca(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An existing two-tier CA, as an operator might bring from another PKI."""
    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Acme Legacy Root")])
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()),
                           critical=False)
            .sign(root_key, hashes.SHA256()))
    sub_key = ec.generate_private_key(ec.SECP256R1())
    sub = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Acme Devices CA")]))
           .issuer_name(root_name).public_key(sub_key.public_key())
           .serial_number(x509.random_serial_number())
           .not_valid_before(now - dt.timedelta(days=1))
           .not_valid_after(now + dt.timedelta(days=1825))
           .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
           .add_extension(x509.SubjectKeyIdentifier.from_public_key(sub_key.public_key()),
                          critical=False)
           .sign(root_key, hashes.SHA256()))
    paths = tmp_path / "root.pem", tmp_path / "sub.pem", tmp_path / "sub.key"
    paths[0].write_bytes(root.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(sub.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(sub_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"import-secret")))
    return paths


def test_import_existing_ca_issues_under_it_and_keeps_root_key_away(tmp_path: Path) -> None:
    root_pem, sub_pem, sub_key = _make_external_ca(tmp_path)
    env = dict(os.environ, FLEETWARD_IMPORT_KEY_PASSPHRASE="import-secret")
    server = start_server(tmp_path / "data", extra_init=[
        "--import-ca-cert", str(sub_pem), "--import-ca-key", str(sub_key),
        "--import-root-cert", str(root_pem)], env=env)
    try:
        assert not (server.data_dir / "keys/root-ca.key").exists()
        chain_pem = httpx.get(f"{server.public_url}/ca/chain.pem").content
        chain = x509.load_pem_x509_certificates(chain_pem)
        assert chain[0].subject.rfc4514_string() == "CN=Acme Devices CA"
        assert chain[1].subject.rfc4514_string() == "CN=Acme Legacy Root"
        with server.admin() as client:
            cas = {c["name"]: c for c in client.get("/v1/ca").json()["items"]}
        assert cas["issuing"]["imported"] and cas["issuing"]["key_online"]
        assert cas["root"]["imported"] and not cas["root"]["key_online"]
        server_cert = x509.load_pem_x509_certificates(
            (server.data_dir / "certs/server.pem").read_bytes())[0]
        server_cert.verify_directly_issued_by(chain[0])
        with server.admin() as client:
            audit = client.get("/v1/audit", params={"action": "ca.imported"}).json()["items"]
        assert {e["target"] for e in audit} == {"ca:root", "ca:issuing"}
    finally:
        stop_server(server)


def test_import_refuses_a_key_that_does_not_match(tmp_path: Path) -> None:
    root_pem, sub_pem, _ = _make_external_ca(tmp_path)
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    result = run_init(tmp_path / "data", "--import-ca-cert", str(sub_pem), "--import-ca-key",
                      str(wrong_key), "--import-root-cert", str(root_pem), check=False)
    assert result.returncode != 0
    assert "does not belong" in result.stderr and "hint:" in result.stderr


def test_root_key_moved_offline_server_still_issues(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    run_init(data_dir)
    offline = tmp_path / "offline-root.key"
    (data_dir / "keys/root-ca.key").rename(offline)
    server = start_server(data_dir)  # init is a no-op now; serve must cope without the root key
    try:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d-off")]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
        with server.admin() as client:
            assert client.post("/v1/devices", json={"id": "d-off", "type": "default"}
                               ).status_code == 201
            issued = client.post("/v1/devices/d-off/certificates", json={"csr": csr})
            assert issued.status_code == 201, issued.text
            cas = {c["name"]: c for c in client.get("/v1/ca").json()["items"]}
        assert not cas["root"]["key_online"] and cas["issuing"]["key_online"]
        # The root CRL signed at init is still served.
        root_crl = httpx.get(f"{server.public_url}/crl/root.crl")
        assert root_crl.status_code == 200
        assert "CA key not available" in server.log_file.read_text()
    finally:
        stop_server(server)


def test_init_and_serve_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    env = dict(os.environ, FLEETWARD_DATABASE_URL=postgres_url)
    server = start_server(tmp_path / "data", env=env)
    try:
        assert not (server.data_dir / "fleetward.db").exists()  # nothing went to SQLite
        assert "search_path" in (server.data_dir / "fleetward.toml").read_text()
        with server.admin() as client:
            assert client.post("/v1/devices", json={"id": "pg-1", "type": "default"}
                               ).status_code == 201
            assert client.get("/v1/devices/pg-1").json()["state"] == "registered"
            assert client.get("/v1/audit/verify").json()["ok"] is True
    finally:
        stop_server(server)
    engine = create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        ids = conn.execute(text("SELECT id FROM devices")).scalars().all()
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()
    assert ids == ["pg-1"]
    assert revision == ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
