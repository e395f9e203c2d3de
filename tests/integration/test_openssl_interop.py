"""What a relying party that knows nothing but stock ``openssl`` and ``curl`` sees.

Threats: a device certificate that only our own code accepts (a chain, profile or name
openssl rejects or reads differently); a certificate whose subject or names come from
the CSR instead of the registry; a revocation that ``openssl verify -crl_check`` or
``openssl ocsp`` does not see, or sees without the reason; an OCSP answer that does not
verify, drops the nonce (replay), or says "good" for a certificate we never issued or a
CA we do not run; a GET request (RFC 6960 A.1) that breaks on base64 '/' or '+'.

Every check runs an external tool against a real ``fleetward serve`` process; the step
under test is always a ``fleetward`` command an operator would type. Each positive check
has a negative control, so a tool that "passes" for the wrong reason fails the test.
"""

from __future__ import annotations

import base64
import re
import secrets
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from tests.conftest import RunningServer

ERROR_REVOKED = "error 23 at 0 depth lookup: certificate revoked"  # X509_V_ERR_CERT_REVOKED
ERROR_NO_CRL = "error 3 at 1 depth lookup: unable to get certificate CRL"  # for the issuing CA


def run(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    if ok:
        assert result.returncode == 0, f"{args[:2]} failed:\n{result.stdout}\n{result.stderr}"
    return result


def flat(text: str) -> str:
    """Rich wraps long CLI lines; openssl indents; compare on single spaces."""
    return " ".join(text.split())


# --- keys and CSRs made the way device vendors make them -------------------------------

KEYGEN: dict[str, list[str]] = {  # how → openssl command that writes the key to {key}
    "p256-ecparam": ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                     "-out", "{key}"],
    "p256-genpkey": ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                     "ec_paramgen_curve:P-256", "-out", "{key}"],
    "rsa2048-genpkey": ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                        "rsa_keygen_bits:2048", "-out", "{key}"],
}


def openssl_csr(folder: Path, name: str, subject: str, how: str = "p256-genpkey") -> Path:
    key, csr = folder / f"{name}.key", folder / f"{name}.csr"
    run(*(str(key) if part == "{key}" else part for part in KEYGEN[how]))
    run("openssl", "req", "-new", "-key", key, "-subj", subject, "-out", csr)
    return csr


def serial_of(cert: Path) -> int:
    out = run("openssl", "x509", "-in", cert, "-noout", "-serial").stdout
    return int(out.strip().split("=", 1)[1], 16)


@dataclass(frozen=True)
class Issued:
    device_id: str
    cert: Path
    serial: int


def cli_issue(server: RunningServer, folder: Path, device_id: str, *, name: str = "",
              subject: str = "", how: str = "p256-genpkey") -> Issued:
    """`fleetward cert issue` for ``device_id`` from a CSR made by `openssl req`."""
    name = name or device_id
    csr = openssl_csr(folder, name, subject or f"/CN={device_id}", how)
    cert = folder / f"{name}.pem"
    out = flat(server.cli("cert", "issue", "--device", device_id, "--csr", str(csr),
                          "--out", str(cert)).stdout)
    serial = serial_of(cert)
    assert f"issued serial {serial:x} to {device_id}" in out, out
    return Issued(device_id, cert, serial)


def add_device(server: RunningServer, device_id: str) -> None:
    server.cli("device", "add", device_id, "--type", "default")


# --- the CA files and revocation data as a relying party fetches them -------------------


@dataclass(frozen=True)
class CAFiles:
    chain: Path
    root: Path
    issuing: Path


def fetch(url: str, out: Path) -> Path:
    # --path-as-is: curl must not "normalise" a base64 path; --fail: a 404 is an error.
    run("curl", "-sS", "--fail", "--path-as-is", "-o", out, url)
    return out


def fetch_crl_pem(server: RunningServer, folder: Path, name: str) -> Path:
    der = fetch(f"{server.public_url}/crl/{name}.crl",
                folder / f"{name}-{secrets.token_hex(4)}.crl")
    pem = der.with_suffix(".pem")
    run("openssl", "crl", "-inform", "DER", "-in", der, "-out", pem)
    return pem


def crl_bundle(server: RunningServer, folder: Path, *names: str) -> Path:
    """The named CRLs, fetched fresh, in one PEM file for `openssl verify -CRLfile`."""
    bundle = folder / f"crls-{secrets.token_hex(4)}.pem"
    bundle.write_text("".join(fetch_crl_pem(server, folder, n).read_text() for n in names))
    return bundle


def crl_entries(crl_pem: Path) -> dict[int, str]:
    """serial → reason text (or '') as `openssl crl -text` prints them."""
    text = run("openssl", "crl", "-in", crl_pem, "-noout", "-text").stdout
    entries: dict[int, str] = {}
    for block in re.split(r"\n\s*Serial Number: ", text)[1:]:
        serial = int(block.split()[0], 16)
        reason = re.search(r"CRL Reason Code:\s*\n\s*(.+)", block)
        entries[serial] = reason.group(1).strip() if reason else ""
    return entries


def crl_number(crl_pem: Path) -> int:
    out = run("openssl", "crl", "-in", crl_pem, "-noout", "-crlnumber").stdout
    return int(out.strip().split("=", 1)[1], 16)


def verify(ca: CAFiles, cert: Path, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return run("openssl", "verify", *extra, "-CAfile", ca.chain, cert, ok=False)


def ocsp_query(server: RunningServer, ca: CAFiles, cert: Path, *extra: str,
               issuer: Path | None = None) -> subprocess.CompletedProcess[str]:
    # openssl applies a CertID digest flag (-sha256) only to the -cert after it.
    digest = [flag for flag in extra if flag in ("-sha1", "-sha256", "-sha384", "-sha512")]
    extra = tuple(flag for flag in extra if flag not in digest)
    return run("openssl", "ocsp", "-issuer", issuer or ca.issuing, *digest, "-cert", cert,
               "-url", f"{server.public_url}/ocsp", "-CAfile", ca.chain, *extra, ok=False)


def post_ocsp(server: RunningServer, folder: Path, body: bytes) -> ocsp.OCSPResponse:
    request = folder / f"post-{secrets.token_hex(4)}.der"
    request.write_bytes(body)
    response = request.with_suffix(".resp")
    run("curl", "-sS", "--fail", "-o", response, "-H", "Content-Type: application/ocsp-request",
        "--data-binary", f"@{request}", f"{server.public_url}/ocsp")
    return ocsp.load_der_ocsp_response(response.read_bytes())


# --- module fixtures: one server, a few certificates -----------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openssl")


@pytest.fixture(scope="module")
def ca(server: RunningServer) -> CAFiles:
    certs = server.data_dir / "certs"
    return CAFiles(certs / "chain.pem", certs / "root-ca.pem", certs / "issuing-ca.pem")


@pytest.fixture(scope="module")
def live(server: RunningServer, work: Path) -> Issued:
    """A certificate nobody revokes: the negative control for every "revoked" check."""
    add_device(server, "live-1")
    return cli_issue(server, work, "live-1")


@pytest.fixture(scope="module")
def revoked(server: RunningServer, work: Path) -> Issued:
    """A certificate revoked with `fleetward cert revoke SERIAL --reason keyCompromise`."""
    add_device(server, "stolen-1")
    issued = cli_issue(server, work, "stolen-1")
    out = flat(server.cli("cert", "revoke", f"{issued.serial:x}",
                          "--reason", "keyCompromise").stdout)
    assert f"revoked {issued.serial:x} (key_compromise)" in out, out
    return issued


@dataclass(frozen=True)
class Foreign:
    ca: Path
    cert: Path


def foreign_ca(folder: Path, name: str, subject: str, device_id: str) -> Foreign:
    """A CA made with `openssl req -x509`, and a device-looking leaf it signed."""
    key, ca_cert = folder / f"{name}-ca.key", folder / f"{name}-ca.pem"
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", key, "-out", ca_cert, "-subj", subject, "-days", "30",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    csr = openssl_csr(folder, f"{name}-leaf", f"/CN={device_id}")
    ext = folder / f"{name}-leaf.cnf"
    ext.write_text(f"subjectAltName=URI:urn:fleetward:device:{device_id}\n"
                   "extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\n")
    leaf = folder / f"{name}-leaf.pem"
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", key,
        "-set_serial", f"0x{secrets.token_hex(16)}", "-days", "5", "-extfile", ext, "-out", leaf)
    return Foreign(ca_cert, leaf)


@pytest.fixture(scope="module")
def foreign(ca: CAFiles, work: Path) -> dict[str, Foreign]:
    # The lookalike copies our issuing CA's name: only the key tells them apart.
    our_name = run("openssl", "x509", "-in", ca.issuing, "-noout", "-subject",
                   "-nameopt", "compat").stdout.strip().removeprefix("subject=")
    return {
        "unrelated": foreign_ca(work, "unrelated", "/O=Mallory/CN=Mallory CA", "live-1"),
        "lookalike": foreign_ca(work, "lookalike", our_name, "live-1"),
    }


# --- 1. issued certificates read and verify with openssl --------------------------------

ISSUANCE = [  # (key generator, CSR subject, what the CSR tries to smuggle into the subject)
    ("p256-ecparam", "/CN={id}", ""),
    ("p256-genpkey", "/C=US/O=Evil Corp/OU=admins/CN={id}", "Evil Corp"),
    ("rsa2048-genpkey", "/O=Evil Corp/emailAddress=root@evil.example", "evil.example"),
]


@pytest.mark.parametrize(("how", "subject", "smuggled"), ISSUANCE,
                         ids=[row[0] for row in ISSUANCE])
def test_openssl_csr_gives_certificate_openssl_verifies_with_profile_not_csr_names(
    server: RunningServer, ca: CAFiles, work: Path, how: str, subject: str, smuggled: str,
) -> None:
    device_id = f"iss-{how}"
    add_device(server, device_id)
    issued = cli_issue(server, work, device_id, subject=subject.format(id=device_id), how=how)

    result = verify(ca, issued.cert)
    assert result.returncode == 0 and f"{issued.cert}: OK" in result.stdout, result
    text = flat(run("openssl", "x509", "-in", issued.cert, "-noout", "-text").stdout)
    for expected in (
        "X509v3 Extended Key Usage: TLS Web Client Authentication",
        f"X509v3 Subject Alternative Name: URI:urn:fleetward:device:{device_id}",
        f"X509v3 CRL Distribution Points: Full Name: URI:{server.public_url}/crl/issuing.crl",
        f"OCSP - URI:{server.public_url}/ocsp",
        "X509v3 Basic Constraints: critical CA:FALSE",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text}"
    assert "TLS Web Server Authentication" not in text
    # The subject comes from the registry alone: exactly CN=<device id>.
    subject_line = run("openssl", "x509", "-in", issued.cert, "-noout", "-subject").stdout
    assert subject_line.strip() == f"subject=CN = {device_id}"
    if smuggled:
        assert smuggled not in text
    # RFC 5280 §4.1.2.2: ≤ 20 octets; ours are 128 random bits (≤ 16 octets, and so far
    # above 2^64 that a counter or a truncated RNG shows up).
    assert 2**64 < issued.serial < 2**128


@pytest.mark.parametrize("kind", ["unrelated", "lookalike"])
def test_certificate_from_foreign_openssl_ca_does_not_verify_against_our_chain(
    ca: CAFiles, foreign: dict[str, Foreign], live: Issued, kind: str,
) -> None:
    other = foreign[kind]
    # Control: the foreign leaf is sound under its own CA, and ours is under our chain.
    own = run("openssl", "verify", "-CAfile", other.ca, other.cert, ok=False)
    assert own.returncode == 0, own
    assert verify(ca, live.cert).returncode == 0
    result = verify(ca, other.cert)
    assert result.returncode != 0
    assert ("error 20" in result.stdout + result.stderr  # unrelated: no issuer found
            or "error 7" in result.stdout + result.stderr), result  # lookalike: bad signature


# --- 2. CRLs ----------------------------------------------------------------------------


def test_revocation_seen_by_openssl_verify_crl_check(
    server: RunningServer, ca: CAFiles, work: Path, live: Issued,
) -> None:
    add_device(server, "crl-1")
    victim = cli_issue(server, work, "crl-1")
    before = crl_bundle(server, work, "issuing", "root")
    result = verify(ca, victim.cert, "-crl_check", "-CRLfile", before)
    assert result.returncode == 0 and "OK" in result.stdout, result  # not revoked yet

    server.cli("cert", "revoke", f"{victim.serial:x}", "--reason", "keyCompromise")
    crls = crl_bundle(server, work, "issuing", "root")
    for flag in ("-crl_check", "-crl_check_all"):
        result = verify(ca, victim.cert, flag, "-CRLfile", crls)
        assert result.returncode != 0 and ERROR_REVOKED in result.stderr + result.stdout, result
        control = verify(ca, live.cert, flag, "-CRLfile", crls)
        assert control.returncode == 0, control
    # The stale CRL fetched before revocation would still accept it: the fresh one matters.
    assert verify(ca, victim.cert, "-crl_check", "-CRLfile", before).returncode == 0
    issuing_only = crl_bundle(server, work, "issuing")
    entries = crl_entries(issuing_only)
    assert entries.get(victim.serial) == "Key Compromise", entries
    assert live.serial not in entries
    # -crl_check_all really consults the root CRL: without it the chain check fails.
    result = verify(ca, live.cert, "-crl_check_all", "-CRLfile", issuing_only)
    assert result.returncode != 0 and ERROR_NO_CRL in result.stderr + result.stdout, result


def test_root_crl_is_empty_and_signed_by_the_root(
    server: RunningServer, ca: CAFiles, work: Path, revoked: Issued,
) -> None:
    root_crl = fetch_crl_pem(server, work, "root")
    result = run("openssl", "crl", "-in", root_crl, "-CAfile", ca.root, "-noout")
    assert "verify OK" in result.stderr + result.stdout, result
    assert crl_entries(root_crl) == {}
    assert "No Revoked Certificates" in run("openssl", "crl", "-in", root_crl, "-noout",
                                            "-text").stdout
    # Negative control: the same check against the wrong CA must not say OK.
    wrong = run("openssl", "crl", "-in", root_crl, "-CAfile", ca.issuing, "-noout", ok=False)
    assert "verify OK" not in wrong.stderr + wrong.stdout, wrong
    # The issuing CRL (which lists the revoked certificate) verifies under the issuing CA.
    issuing_crl = fetch_crl_pem(server, work, "issuing")
    result = run("openssl", "crl", "-in", issuing_crl, "-CAfile", ca.chain, "-noout")
    assert "verify OK" in result.stderr + result.stdout, result
    assert revoked.serial in crl_entries(issuing_crl)


def test_crl_number_increases_with_every_revocation(
    server: RunningServer, ca: CAFiles, work: Path,
) -> None:
    add_device(server, "crlnum-1")
    certs = [cli_issue(server, work, "crlnum-1", name=f"crlnum-1-{i}") for i in range(2)]
    numbers = [crl_number(fetch_crl_pem(server, work, "issuing"))]
    for issued in certs:
        server.cli("cert", "revoke", f"{issued.serial:x}", "--reason", "superseded")
        pem = fetch_crl_pem(server, work, "issuing")
        numbers.append(crl_number(pem))
        # RFC 5280 §5.2.3 via cryptography too, so a misread openssl line cannot pass.
        der = x509.load_pem_x509_crl(pem.read_bytes())
        assert der.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number \
            == numbers[-1]
    assert numbers[0] < numbers[1] < numbers[2], numbers


# --- 3. OCSP ----------------------------------------------------------------------------

OCSP_POST = [  # (certificate, extra openssl ocsp flags, expected status line, reason)
    ("live", [], "good", None),
    ("revoked", [], "revoked", "keyCompromise"),
    ("revoked", ["-no_nonce"], "revoked", "keyCompromise"),
    ("revoked", ["-sha256"], "revoked", "keyCompromise"),  # CertID hashed with SHA-256
]


@pytest.mark.parametrize(("which", "flags", "status", "reason"), OCSP_POST,
                         ids=["live", "revoked", "revoked-no-nonce", "revoked-sha256-certid"])
def test_openssl_ocsp_post_reports_status_and_reason_with_valid_signature(
    server: RunningServer, ca: CAFiles, live: Issued, revoked: Issued,
    which: str, flags: list[str], status: str, reason: str | None,
) -> None:
    cert = {"live": live, "revoked": revoked}[which].cert
    result = ocsp_query(server, ca, cert, *flags, "-resp_text")
    assert result.returncode == 0, result
    assert f"{cert}: {status}" in result.stdout, result.stdout
    assert "Response verify OK" in result.stderr, result.stderr
    assert "nonce" not in result.stderr.lower(), result.stderr  # e.g. "nonce verify error"
    if reason:
        assert f"Reason: {reason}" in result.stdout
    else:
        assert "Reason:" not in result.stdout
    if "-sha256" in flags:
        assert "Hash Algorithm: sha256" in result.stdout
    if "-no_nonce" in flags:
        assert "OCSP Nonce" not in result.stdout
    else:
        assert "OCSP Nonce" in result.stdout


def test_ocsp_nonce_is_echoed_and_a_replayed_response_is_caught(
    server: RunningServer, ca: CAFiles, work: Path, revoked: Issued,
) -> None:
    requests, responses = [], []
    for n in range(2):
        req, resp = work / f"nonce-{n}.req", work / f"nonce-{n}.resp"
        run("openssl", "ocsp", "-issuer", ca.issuing, "-cert", revoked.cert, "-reqout", req)
        run("openssl", "ocsp", "-reqin", req, "-url", f"{server.public_url}/ocsp",
            "-respout", resp, "-issuer", ca.issuing, "-CAfile", ca.chain)
        requests.append(ocsp.load_der_ocsp_request(req.read_bytes()))
        responses.append(ocsp.load_der_ocsp_response(resp.read_bytes()))
    sent = [r.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce for r in requests]
    echoed = [r.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce for r in responses]
    assert sent == echoed and sent[0] != sent[1]
    # Replay: the answer to request 1 presented as the answer to request 0.
    replay = run("openssl", "ocsp", "-reqin", work / "nonce-0.req", "-respin",
                 work / "nonce-1.resp", "-issuer", ca.issuing, "-CAfile", ca.chain, ok=False)
    assert "Nonce Verify error" in replay.stderr, replay
    fresh = run("openssl", "ocsp", "-reqin", work / "nonce-1.req", "-respin",
                work / "nonce-1.resp", "-issuer", ca.issuing, "-CAfile", ca.chain)
    assert "Response verify OK" in fresh.stderr and "Nonce" not in fresh.stderr, fresh


def _request_with_awkward_base64(ca: CAFiles, cert: Path, folder: Path) -> tuple[Path, str]:
    """An OCSP request whose base64 has both '/' and '+' (the nonce is random: retry)."""
    for attempt in range(64):
        req = folder / f"get-{attempt}.req"
        run("openssl", "ocsp", "-issuer", ca.issuing, "-cert", cert, "-reqout", req)
        encoded = base64.b64encode(req.read_bytes()).decode()
        if "/" in encoded and "+" in encoded:
            return req, encoded
    raise AssertionError("no request with '/' and '+' in its base64 after 64 tries")


GET_ENCODINGS = {  # RFC 6960 A.1 says url-encode; clients in the wild also send it raw
    "url-encoded": lambda b64: urllib.parse.quote(b64, safe=""),
    "raw-base64": lambda b64: b64,
}


@pytest.mark.parametrize("encoding", list(GET_ENCODINGS))
def test_ocsp_get_rfc6960_a1_answers_like_post(
    server: RunningServer, ca: CAFiles, work: Path, revoked: Issued, encoding: str,
) -> None:
    req, b64 = _request_with_awkward_base64(ca, revoked.cert, work)
    resp = fetch(f"{server.public_url}/ocsp/{GET_ENCODINGS[encoding](b64)}",
                 work / f"get-{encoding}.resp")
    result = run("openssl", "ocsp", "-reqin", req, "-respin", resp, "-issuer", ca.issuing,
                 "-CAfile", ca.chain, "-resp_text")
    assert "Response verify OK" in result.stderr and "Nonce" not in result.stderr, result
    parsed = ocsp.load_der_ocsp_response(resp.read_bytes())
    assert parsed.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert parsed.serial_number == revoked.serial
    assert parsed.certificate_status == ocsp.OCSPCertStatus.REVOKED
    assert parsed.revocation_reason == x509.ReasonFlags.key_compromise
    assert "Reason: keyCompromise" in result.stdout or "Key Compromise" in result.stdout


MALFORMED = {  # name → how to spoil a valid request (the "valid" row is the control)
    "valid": lambda der: der,
    "garbage": lambda der: b"this is not DER at all",
    "truncated": lambda der: der[: len(der) // 2],
    "trailing-bytes": lambda der: der + b"\x00\x00",
    "oversized": lambda der: der + b"\x00" * 20_000,
}


@pytest.mark.parametrize("spoil", list(MALFORMED))
def test_ocsp_post_of_garbage_gets_malformed_request(
    server: RunningServer, ca: CAFiles, work: Path, live: Issued, spoil: str,
) -> None:
    req = work / f"malformed-{spoil}.req"
    run("openssl", "ocsp", "-issuer", ca.issuing, "-cert", live.cert, "-reqout", req)
    response = post_ocsp(server, work, MALFORMED[spoil](req.read_bytes()))
    expected = (ocsp.OCSPResponseStatus.SUCCESSFUL if spoil == "valid"
                else ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    assert response.response_status == expected


def test_ocsp_get_of_non_base64_gets_malformed_request(
    server: RunningServer, work: Path,
) -> None:
    resp = fetch(f"{server.public_url}/ocsp/not%20base64%21", work / "get-garbage.resp")
    parsed = ocsp.load_der_ocsp_response(resp.read_bytes())
    assert parsed.response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


@pytest.mark.parametrize("kind", ["unrelated", "lookalike"])
def test_ocsp_for_a_foreign_ca_is_unauthorized_never_good(
    server: RunningServer, ca: CAFiles, work: Path, foreign: dict[str, Foreign], kind: str,
) -> None:
    other = foreign[kind]
    result = ocsp_query(server, ca, other.cert, issuer=other.ca)
    assert result.returncode != 0
    assert "Responder Error: unauthorized (6)" in result.stdout + result.stderr, result
    assert ": good" not in result.stdout
    req = work / f"foreign-{kind}.req"
    run("openssl", "ocsp", "-issuer", other.ca, "-cert", other.cert, "-reqout", req)
    response = post_ocsp(server, work, req.read_bytes())
    assert response.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_ocsp_mixed_certid_of_two_of_our_cas_is_unauthorized(
    server: RunningServer, ca: CAFiles, live: Issued,
) -> None:
    # openssl hashes the *certificate's* issuer name with the given issuer's key: the
    # name of our issuing CA with the key of our root matches no CA we run.
    result = ocsp_query(server, ca, live.cert, issuer=ca.root)
    assert "Responder Error: unauthorized (6)" in result.stdout + result.stderr, result


UNKNOWN = [  # (issuer file attr, serial) → never issued by that CA
    ("issuing", "never-issued"),
    ("root", "issued-by-issuing"),  # a real serial, asked of the wrong one of our CAs
]


@pytest.mark.parametrize(("issuer", "serial_kind"), UNKNOWN, ids=[r[1] for r in UNKNOWN])
def test_ocsp_serial_we_never_issued_is_unknown(
    server: RunningServer, ca: CAFiles, live: Issued, issuer: str, serial_kind: str,
) -> None:
    serial = live.serial if serial_kind == "issued-by-issuing" else int(secrets.token_hex(16), 16)
    result = run("openssl", "ocsp", "-issuer", getattr(ca, issuer), "-serial", f"0x{serial:x}",
                 "-url", f"{server.public_url}/ocsp", "-CAfile", ca.chain, ok=False)
    assert result.returncode == 0, result
    assert f"0x{serial:x}: unknown" in result.stdout, result.stdout
    assert "Response verify OK" in result.stderr, result.stderr
    # Control: the same serial asked of the right CA is known.
    if serial_kind == "issued-by-issuing":
        right = run("openssl", "ocsp", "-issuer", ca.issuing, "-serial", f"0x{serial:x}",
                    "-url", f"{server.public_url}/ocsp", "-CAfile", ca.chain)
        assert f"0x{serial:x}: good" in right.stdout, right.stdout


# --- 4. device compromise ---------------------------------------------------------------


def test_device_compromise_revokes_every_certificate_for_crl_and_ocsp(
    server: RunningServer, ca: CAFiles, work: Path, live: Issued,
) -> None:
    add_device(server, "pwned-1")
    certs = [cli_issue(server, work, "pwned-1", name=f"pwned-1-{i}") for i in range(2)]
    for issued in certs:
        assert ": good" in ocsp_query(server, ca, issued.cert).stdout  # before: good

    out = flat(server.cli("device", "compromise", "pwned-1").stdout)
    assert "compromised" in out, out

    crl = fetch_crl_pem(server, work, "issuing")
    entries = crl_entries(crl)
    for issued in certs:
        assert entries.get(issued.serial) == "Key Compromise", entries
        result = ocsp_query(server, ca, issued.cert)
        assert f"{issued.cert}: revoked" in result.stdout, result.stdout
        assert "Reason: keyCompromise" in result.stdout
        assert "Response verify OK" in result.stderr
        check = verify(ca, issued.cert, "-crl_check", "-CRLfile", crl)
        assert ERROR_REVOKED in check.stdout + check.stderr, check
    # Another device's certificate is untouched.
    assert live.serial not in entries
    assert f"{live.cert}: good" in ocsp_query(server, ca, live.cert).stdout
