"""The shared TLS configuration, checked with `openssl s_client` against the admin,
device HTTPS and MQTT listeners.

Each refusal has a negative control: the same client command succeeds against an
`openssl s_server` that does allow the weak setting, so a client that refuses by itself
(Debian's default security level refuses TLS 1.1) cannot make the test pass.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RunningServer, free_port
from tests.integration.channel_helpers import DeviceIdentity, make_device


def s_client(port: int, *args: str, ca: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         "-CAfile", str(ca), "-verify_return_error", *args],
        input="", capture_output=True, text=True, timeout=30)


def handshake_ok(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == 0 and "Cipher is (NONE)" not in result.stdout \
        and "Verify return code: 0 (ok)" in result.stdout


@pytest.fixture(scope="module")
def weak_server(server: RunningServer) -> Iterator[int]:
    """openssl s_server with our server certificate that accepts TLS 1.1 and CBC suites."""
    port = free_port()
    process = subprocess.Popen(
        ["openssl", "s_server", "-accept", str(port), "-www",
         "-cert", str(server.data_dir / "certs/server.pem"),
         "-key", str(server.data_dir / "keys/server.key"),
         "-pass", f"file:{server.data_dir / 'secrets/ca-passphrase'}",
         "-cipher", "DEFAULT:@SECLEVEL=0", "-min_protocol", "TLSv1.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    yield port
    process.terminate()
    process.wait(5)


@pytest.fixture(scope="module")
def device(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> DeviceIdentity:
    return make_device(server, tmp_path_factory.mktemp("tls-device"), "tls-device")


LISTENERS = ["admin", "device", "mqtt"]


def listener_args(server: RunningServer, device: DeviceIdentity,
                  listener: str) -> tuple[int, list[str]]:
    """Port and client-certificate flags: the MQTT listener requires a certificate."""
    if listener == "mqtt":
        return server.mqtt_port, ["-cert", str(device.cert), "-key", str(device.key)]
    return (server.admin_port if listener == "admin" else server.device_port), []


LEGACY = [("tls1", ["-tls1"]), ("tls1_1", ["-tls1_1"])]


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize(("name", "flags"), LEGACY, ids=[n for n, _ in LEGACY])
def test_legacy_protocol_versions_are_refused(server: RunningServer, weak_server: int,
                                              device: DeviceIdentity, name: str,
                                              flags: list[str], listener: str) -> None:
    port, cert_args = listener_args(server, device, listener)
    args = [*flags, "-cipher", "DEFAULT:@SECLEVEL=0", *cert_args]
    assert not handshake_ok(s_client(port, *args, ca=server.chain))
    if name == "tls1_1":  # negative control: this client really speaks TLS 1.1
        assert handshake_ok(s_client(weak_server, *args, ca=server.chain))


@pytest.mark.parametrize("listener", LISTENERS)
def test_tls12_non_aead_cipher_is_refused(server: RunningServer, weak_server: int,
                                          device: DeviceIdentity, listener: str) -> None:
    # ECDSA certificate, so offer an ECDSA-compatible CBC suite (ARCHITECTURE §4a).
    port, cert_args = listener_args(server, device, listener)
    args = ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA", *cert_args]
    assert not handshake_ok(s_client(port, *args, ca=server.chain))
    assert handshake_ok(s_client(weak_server, *args, ca=server.chain))


@pytest.mark.parametrize("listener", LISTENERS)
def test_tls12_ecdhe_aead_and_tls13_are_accepted(server: RunningServer, device: DeviceIdentity,
                                                 listener: str) -> None:
    port, cert_args = listener_args(server, device, listener)
    tls12 = s_client(port, "-tls1_2", *cert_args, ca=server.chain)
    assert handshake_ok(tls12) and "ECDHE-ECDSA-AES" in tls12.stdout and "GCM" in tls12.stdout
    tls13 = s_client(port, "-tls1_3", *cert_args, ca=server.chain)
    assert handshake_ok(tls13) and "TLSv1.3" in tls13.stdout


@pytest.mark.parametrize("listener", LISTENERS)
def test_default_handshake_prefers_tls13(server: RunningServer, device: DeviceIdentity,
                                         listener: str) -> None:
    port, cert_args = listener_args(server, device, listener)
    assert "TLSv1.3" in s_client(port, *cert_args, ca=server.chain).stdout
