"""A small admin API client for the CLI (httpx, TLS verified against our CA chain)."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fleetward.config import DataDirLayout
from fleetward.errors import ConfigurationError, FleetwardError

ADMIN_URL_ENV = "FLEETWARD_ADMIN_URL"
ADMIN_TOKEN_ENV = "FLEETWARD_ADMIN_TOKEN"
ADMIN_CA_ENV = "FLEETWARD_ADMIN_CA"
DATA_DIR_ENV = "FLEETWARD_DATA_DIR"
TIMEOUT_SECONDS = 30.0


class ApiError(FleetwardError):
    """The admin API answered with a problem document."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(str(problem.get("detail") or problem.get("title") or f"HTTP {status}"),
                         hint=str(problem.get("hint") or "see the server log"))
        self.status = status
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Connection:
    url: str
    token: str
    ca_file: Path | None


def resolve_connection(data_dir: Path | None, admin_url: str | None,
                       ca_file: Path | None) -> Connection:
    """Find the admin URL, token and CA: flags, then env, then the data directory.

    Raises:
        ConfigurationError: nothing tells where the admin API is or what token to use.
    """
    env = os.environ
    data_dir = data_dir or (Path(env[DATA_DIR_ENV]) if env.get(DATA_DIR_ENV) else None)
    layout = DataDirLayout(data_dir) if data_dir else None
    url = admin_url or env.get(ADMIN_URL_ENV)
    if not url and layout and layout.admin_url_file.exists():
        url = layout.admin_url_file.read_text().strip()
    token = env.get(ADMIN_TOKEN_ENV)
    if not token and layout and layout.admin_token_file.exists():
        token = layout.admin_token_file.read_text().strip()
    if ca_file is None and env.get(ADMIN_CA_ENV):
        ca_file = Path(env[ADMIN_CA_ENV])
    if ca_file is None and layout and layout.chain_file.exists():
        ca_file = layout.chain_file
    if not url or not token:
        raise ConfigurationError(
            "no admin API to talk to",
            hint=f"on the server host pass --data-dir (or set {DATA_DIR_ENV}); elsewhere pass "
                 f"--admin-url and set {ADMIN_TOKEN_ENV} (and {ADMIN_CA_ENV} for the CA chain)")
    return Connection(url.rstrip("/"), token, ca_file)


class AdminClient:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        verify: ssl.SSLContext | bool = True
        if connection.ca_file is not None:
            verify = _trust_context(connection.ca_file)
        self._http = httpx.Client(
            base_url=connection.url, verify=verify, timeout=TIMEOUT_SECONDS,
            headers={"Authorization": f"Bearer {connection.token}",
                     "Accept": "application/json"})

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, json: Any = None,
                params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        """One API call; the decoded JSON body, or None for 204.

        Raises:
            ApiError: the server answered with a problem document.
            ConfigurationError: the server cannot be reached or its TLS verified.
        """
        try:
            response = self._http.request(method, path, json=json, params=params,
                                          timeout=timeout or TIMEOUT_SECONDS)
        except httpx.TransportError as exc:
            if _caused_by(exc, ssl.SSLCertVerificationError):
                raise ConfigurationError(
                    f"cannot verify the TLS certificate of the admin API at "
                    f"{self.connection.url}: {exc}",
                    hint=f"pass the CA chain that signed it with --ca-file (or set "
                         f"{ADMIN_CA_ENV}); `fleetward init` wrote it to "
                         f"<data-dir>/certs/chain.pem") from exc
            raise ConfigurationError(
                f"cannot reach the admin API at {self.connection.url}: {exc}",
                hint="is `fleetward serve` running, and is the URL right?") from exc
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text[:200]}
            error = ApiError(response.status_code, problem)
            if response.status_code == 401:
                # The server's hint speaks HTTP; the CLI user sets a variable or a file.
                error.hint = (f"check {ADMIN_TOKEN_ENV} (or <data-dir>/secrets/admin-token "
                              f"on the server host); `fleetward operator add` makes new tokens")
            raise error
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean)

    def post(self, path: str, body: dict[str, Any], *, timeout: float | None = None) -> Any:
        return self.request("POST", path, json=body, timeout=timeout)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)


def _trust_context(ca_file: Path) -> ssl.SSLContext:
    """A TLS context that trusts only the certificates in ``ca_file``.

    Raises:
        ConfigurationError: the file is missing, unreadable or holds no PEM certificate.
    """
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except OSError as exc:  # ssl.SSLError is an OSError too
        raise ConfigurationError(
            f"cannot use {ca_file} as the admin API's CA chain: {exc.strerror or exc}",
            hint=f"pass a readable PEM file with --ca-file (or {ADMIN_CA_ENV}); "
                 f"`fleetward init` wrote it to <data-dir>/certs/chain.pem") from exc


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is anywhere in the cause/context chain of ``exc``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
