"""``fleetward factory``: provision devices in batches on a production line."""

from __future__ import annotations

import csv
import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any, NoReturn

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rich.markup import escape

from fleetward.cli.client import AdminClient, ApiError
from fleetward.cli.common import (
    AdminUrl,
    App,
    CaFile,
    DataDir,
    TtlHours,
    api,
    err,
    fail,
    out,
    progress,
)
from fleetward.errors import ConfigurationError, FleetwardError, InvalidInput
from fleetward.model import validate_device_id

app = App(help="Provision devices in batches on a production line.",
          no_args_is_help=True)


FACTORY_CHUNK = 500  # devices per API call (the server's per-request maximum)
FACTORY_TIMEOUT_SECONDS = 300.0  # one chunk is one transaction of 500 devices and tokens
MANIFEST_COLUMNS = ["device_id", "token", "token_id", "expires_at"]
CSR_SUFFIXES = (".csr", ".pem", ".der")


def _create_exclusive(path: Path) -> IO[str]:
    """Open a new file 0600; never an existing one (tokens are written exactly once).

    O_EXCL with O_CREAT also refuses a symlink planted at ``path`` (POSIX open(2)).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fail(InvalidInput(f"{path} already exists; it may hold tokens that cannot be "
                          "retrieved again", hint="choose another --out file"))
    except OSError as exc:
        fail(InvalidInput(f"cannot create {path}: {exc.strerror}",
                          hint="pass --out with a file path in a writable directory"))
    os.fchmod(fd, 0o600)  # whatever the umask says
    return os.fdopen(fd, "w", newline="", encoding="utf-8")


@app.command("tokens")
def factory_tokens(type_name: Annotated[str, typer.Option("--type", help="device type")],
                   count: Annotated[int, typer.Option("--count", min=1,
                                                      help="how many devices")],
                   out_file: Annotated[Path, typer.Option(
                       "--out", help="new CSV manifest (0600): device_id,token,token_id,"
                                     "expires_at")],
                   owner: Annotated[str, typer.Option(help="owner / tenant")] = "default",
                   id_prefix: Annotated[str, typer.Option(
                       "--id-prefix", help="device ids are this + 12 random hex")] = "",
                   ttl_hours: TtlHours = None, data_dir: DataDir = None,
                   admin_url: AdminUrl = None, ca_file: CaFile = None) -> None:
    """Register COUNT new devices, each with a single-use bootstrap token, into a manifest.

    The manifest is the only copy of the tokens: keep it safe and delete it once the
    devices are flashed.
    """
    created = 0
    body: dict[str, Any] = {"type": type_name, "owner": owner, "id_prefix": id_prefix}
    if ttl_hours is not None:
        body["ttl_hours"] = ttl_hours
    with api(data_dir, admin_url, ca_file) as client, _create_exclusive(out_file) as manifest:
        writer = csv.writer(manifest)
        writer.writerow(MANIFEST_COLUMNS)
        manifest.flush()
        try:
            with progress() as bar:
                task = bar.add_task("registering devices", total=count)
                while created < count:
                    chunk = min(FACTORY_CHUNK, count - created)
                    items = client.post("/v1/factory/tokens", {**body, "count": chunk},
                                        timeout=FACTORY_TIMEOUT_SECONDS)["items"]
                    writer.writerows([[i[c] for c in MANIFEST_COLUMNS] for i in items])
                    manifest.flush()
                    os.fsync(manifest.fileno())  # the rows outlive a crash of this process
                    created += len(items)
                    bar.advance(task, len(items))
        except (FleetwardError, OSError, KeyboardInterrupt) as exc:
            _factory_tokens_failed(exc, created, count, out_file)
    out.print(f"registered {created} {type_name} devices; their tokens are in {out_file} "
              "(mode 0600), the only copy", markup=False, highlight=False)


def _factory_tokens_failed(exc: BaseException, created: int, count: int,
                           out_file: Path) -> NoReturn:
    """Say what exists after a failed run: the rows already written stay in the manifest."""
    if created == 0:
        out_file.unlink(missing_ok=True)  # holds no token: do not block a re-run
        kept = "nothing was created"
    else:
        kept = f"created {created} of {count} devices; their rows are in {out_file}"
    # An API error means the server answered and rolled the request back. Otherwise
    # (connection lost, interrupted, manifest not writable) the last request may have
    # registered devices whose tokens never reached the manifest.
    orphans = ("" if isinstance(exc, ApiError) else
               "; the last request may have registered devices that are not in the "
               "manifest: find them with `fleetward device list --state registered` and "
               "give them tokens with `fleetward bootstrap-token create --device ID`")
    if isinstance(exc, KeyboardInterrupt):
        fail(InvalidInput(f"interrupted: {kept}", hint=f"run again for the rest{orphans}"), 130)
    if isinstance(exc, OSError):
        fail(InvalidInput(f"cannot write {out_file}: {exc.strerror} ({kept})",
                          hint=f"free space or fix permissions, then run again{orphans}"))
    if isinstance(exc, FleetwardError):
        fail(InvalidInput(f"{exc.message} ({kept})", hint=f"{exc.hint}{orphans}"))
    raise exc


@dataclass(frozen=True, slots=True)
class _SignJob:
    device_id: str
    csr_file: Path


class _Abort(Exception):
    """An error that every further request would hit too (no server, bad token)."""


def _sign_jobs(csr_dir: Path, manifest: Path | None) -> list[_SignJob]:
    """What to sign: the manifest's rows, else every <device-id>.csr/.pem/.der in the folder."""
    if manifest is None:
        jobs = [_SignJob(p.stem, p) for p in sorted(csr_dir.iterdir())
                if p.is_file() and p.suffix.lower() in CSR_SUFFIXES]
    else:
        try:
            with manifest.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not {"csr_file", "device_id"} <= set(reader.fieldnames or ()):
                    fail(InvalidInput(f"{manifest} needs the columns csr_file,device_id",
                                      hint="first line: csr_file,device_id"))
                jobs = [_SignJob((row["device_id"] or "").strip(),
                                 csr_dir / (row["csr_file"] or "").strip()) for row in reader]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            fail(InvalidInput(f"cannot read the manifest {manifest}: {exc}",
                              hint="a UTF-8 CSV file with the columns csr_file,device_id"))
    if not jobs:
        fail(InvalidInput(f"no CSRs to sign in {manifest or csr_dir}",
                          hint="name the files <device-id>.csr (or .pem, .der), or pass "
                               "--manifest with the columns csr_file,device_id"))
    seen: dict[str, Path] = {}
    for job in jobs:
        if job.device_id in seen:
            fail(InvalidInput(f"two CSRs for device {job.device_id!r}: {seen[job.device_id]} "
                              f"and {job.csr_file}",
                              hint="one CSR per device; remove or rename one of them"))
        seen[job.device_id] = job.csr_file
    return jobs


def _load_csr(path: Path) -> x509.CertificateSigningRequest:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}",
                           hint="check the file name and permissions") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError:
        raise InvalidInput(f"{path.name} is not a PKCS#10 CSR (PEM or DER)",
                           hint="make one with: openssl req -new -key KEY -out ID.csr") from None


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def _already_signed(cert_file: Path, csr: x509.CertificateSigningRequest) -> bool:
    """True if ``cert_file`` holds a current certificate for the CSR's key."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return False  # missing or unreadable: ask the server (which is idempotent)
    return (_spki(cert.public_key()) == _spki(csr.public_key())
            and cert.not_valid_after_utc > dt.datetime.now(dt.UTC))


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(text, encoding="ascii")
    os.replace(tmp, path)


def _write_chain(client: AdminClient, out_dir: Path) -> None:
    order = {"issuing": 0, "root": 1}
    cas = sorted((c for c in client.get("/v1/ca")["items"] if c["kind"] in order),
                 key=lambda c: order[c["kind"]])
    chain = "".join(c["certificate_pem"] for c in cas)
    target = out_dir / "chain.pem"
    if not target.exists() or target.read_text(encoding="ascii", errors="replace") != chain:
        _write_atomically(target, chain)


def _sign_one(client: AdminClient, job: _SignJob, type_name: str, owner: str,
              out_dir: Path) -> bool:
    """Sign one CSR; True if a new certificate was issued, False if it already existed.

    Raises:
        InvalidInput, ApiError: this CSR failed.
        _Abort: the server cannot be used at all.
    """
    validate_device_id(job.device_id)
    csr = _load_csr(job.csr_file)
    target = out_dir / f"{job.device_id}.pem"
    if _already_signed(target, csr):
        return False
    try:
        result = client.post("/v1/factory/sign", {
            "type": type_name, "device_id": job.device_id, "owner": owner,
            "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode("ascii")})
    except ApiError as exc:
        if exc.status in (401, 403):
            raise _Abort(exc.message) from exc
        raise
    except ConfigurationError as exc:
        raise _Abort(exc.message) from exc
    try:
        _write_atomically(target, result["pem"])
    except OSError as exc:
        # The certificate exists on the server; a re-run fetches it again (reused).
        raise InvalidInput(f"signed serial {result['serial']} but cannot write {target}: "
                           f"{exc.strerror}", hint="fix the output folder and run again") from exc
    return not result["reused"]


@app.command("sign")
def factory_sign(type_name: Annotated[str, typer.Option("--type", help="device type")],
                 csr_dir: Annotated[Path, typer.Option(
                     "--csr-dir", exists=True, file_okay=False,
                     help="folder of CSRs named <device-id>.csr / .pem / .der")],
                 out_dir: Annotated[Path, typer.Option(
                     "--out-dir", help="where <device-id>.pem and chain.pem are written")],
                 manifest: Annotated[Path | None, typer.Option(
                     "--manifest", exists=True, dir_okay=False,
                     help="CSV with columns csr_file,device_id instead of the naming rule")
                                     ] = None,
                 owner: Annotated[str, typer.Option(help="owner of newly registered devices")
                                  ] = "default",
                 data_dir: DataDir = None, admin_url: AdminUrl = None,
                 ca_file: CaFile = None) -> None:
    """Sign a folder of factory CSRs, registering the devices; safe to run again.

    A CSR whose certificate is already in --out-dir is skipped; the server returns the
    certificate it already issued for a CSR instead of issuing another.
    """
    jobs = _sign_jobs(csr_dir, manifest)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(InvalidInput(f"cannot create {out_dir}: {exc.strerror}",
                          hint="pass --out-dir with a writable folder"))
    signed, already, failures = 0, 0, []
    aborted: str | None = None
    with api(data_dir, admin_url, ca_file) as client:
        _write_chain(client, out_dir)
        with progress() as bar:
            task = bar.add_task("signing", total=len(jobs))
            for index, job in enumerate(jobs):
                try:
                    if _sign_one(client, job, type_name, owner, out_dir):
                        signed += 1
                    else:
                        already += 1
                except _Abort as exc:
                    aborted = f"{exc}; {len(jobs) - index} CSR(s) not attempted"
                    break
                except FleetwardError as exc:
                    failures.append(f"{job.csr_file.name} ({job.device_id}): {exc.message}")
                bar.advance(task)
    for failure in failures:
        err.print(f"[bold red]failed:[/] {escape(failure)}", highlight=False)
    out.print(f"signed {signed}, already signed {already}, failed {len(failures)} "
              f"→ {out_dir}", markup=False, highlight=False)
    if aborted:
        fail(InvalidInput(f"stopped: {aborted}",
                          hint="check the admin API and token, then run again; signed CSRs "
                               "are skipped"))
    if failures:
        raise typer.Exit(1)
