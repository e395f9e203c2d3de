"""The agent's state directory: permissions, atomic writes, agent.toml, crash recovery.

Threats: a key, passphrase or config readable by other users (even for a moment while
being written); a secret file that others can read being used anyway; a typo in
agent.toml silently ignored; a renewal interrupted by a power cut leaving a
certificate that does not match the key (a device that can no longer authenticate);
two agent processes rotating the key at the same time.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fleetward.agent.errors import AgentStateError
from fleetward.agent.est_client import certs_to_pem
from fleetward.agent.keystore import FileKeystore, same_public_key
from fleetward.agent.renewal import install_certificate, recover_interrupted
from fleetward.agent.state import (
    AgentConfig,
    KeystoreConfig,
    StateLayout,
    dump_config,
    ensure_state_dir,
    generate_passphrase_file,
    load_certificate_file,
    load_config,
    read_secret_file,
    save_config,
    state_lock,
    write_atomic,
)
from fleetward.errors import InvalidInput
from tests.unit.test_agent_est_client import NOW, Pki


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def enrolled_file_state(root: Path, pki: Pki, *, server_url: str = "https://127.0.0.1:9",
                        not_before: dt.datetime = NOW - dt.timedelta(minutes=5),
                        not_after: dt.datetime = NOW + dt.timedelta(days=90),
                        ) -> tuple[StateLayout, FileKeystore]:
    """A state directory as `enroll` leaves it (file keystore), without a server."""
    layout = ensure_state_dir(root)
    generate_passphrase_file(layout.passphrase)
    config = AgentConfig(server_url=server_url, device_id="dev-1",
                         keystore=KeystoreConfig(kind="file",
                                                 passphrase_file=str(layout.passphrase)))
    save_config(layout, config)
    write_atomic(layout.ca, certs_to_pem([pki.root, pki.issuing]), 0o644)
    keystore = FileKeystore.from_config(layout, config)
    key = keystore.create_pending()
    install_certificate(layout, keystore, pki.leaf(key.public_key(), "dev-1",
                                                   not_before=not_before, not_after=not_after),
                        rotated=True)
    return layout, keystore


# --- directory and files -------------------------------------------------------------------


def test_state_dir_is_created_0700(tmp_path: Path) -> None:
    layout = ensure_state_dir(tmp_path / "a" / "state")
    assert mode(layout.root) == 0o700


def test_an_existing_open_state_dir_is_tightened_to_0700(tmp_path: Path) -> None:
    root = tmp_path / "state"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    ensure_state_dir(root)
    assert mode(root) == 0o700


def test_a_file_in_place_of_the_state_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("x")
    with pytest.raises(AgentStateError):
        ensure_state_dir(tmp_path / "state")


def test_write_atomic_replaces_with_the_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_atomic(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


def test_generated_passphrase_is_random_0600_and_never_regenerated(tmp_path: Path) -> None:
    path = tmp_path / "key-passphrase"
    generate_passphrase_file(path)
    first = path.read_bytes()
    assert mode(path) == 0o600
    assert len(first.strip()) == 64 and bytes.fromhex(first.strip().decode())
    generate_passphrase_file(path)
    assert path.read_bytes() == first
    other = tmp_path / "other"
    generate_passphrase_file(other)
    assert other.read_bytes() != first


@pytest.mark.parametrize("file_mode", [0o640, 0o604, 0o644])
def test_a_secret_file_others_can_read_is_refused(tmp_path: Path, file_mode: int) -> None:
    path = tmp_path / "pin"
    path.write_text("1234\n")
    path.chmod(file_mode)
    with pytest.raises(AgentStateError, match="readable by other users"):
        read_secret_file(path, "PKCS#11 PIN")
    path.chmod(0o600)  # negative control
    assert read_secret_file(path, "PKCS#11 PIN") == b"1234"


def test_an_empty_secret_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(AgentStateError, match="empty"):
        read_secret_file(path, "bootstrap token")


def test_state_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    layout = ensure_state_dir(tmp_path / "state")
    with state_lock(layout), pytest.raises(AgentStateError, match="another fleetward-agent"), \
            state_lock(layout):
        pass
    with state_lock(layout):  # released: can be taken again
        pass


# --- agent.toml ----------------------------------------------------------------------------


def pkcs11_config(pin_file: str = "/etc/fleetward/pin") -> AgentConfig:
    return AgentConfig(
        server_url="https://fleet.example:8443", device_id="gw-7", est_label="gateway",
        keystore=KeystoreConfig(kind="pkcs11", module="/usr/lib/softhsm/libsofthsm2.so",
                                token_label='tok "A"\\1', pin_file=pin_file,
                                key_label="fleetward-gw-7-0a0b0c0d"))


def test_config_round_trips_and_is_0600(tmp_path: Path) -> None:
    layout = ensure_state_dir(tmp_path / "state")
    config = pkcs11_config()
    save_config(layout, config)
    assert load_config(layout) == config
    assert mode(layout.config) == 0o600


def test_config_holds_the_pin_file_path_but_never_a_pin(tmp_path: Path) -> None:
    text = dump_config(pkcs11_config("/run/secrets/token-pin")).decode()
    assert 'pin_file = "/run/secrets/token-pin"' in text
    assert "pin =" not in text and "passphrase =" not in text


def test_unknown_config_entries_are_refused(tmp_path: Path) -> None:
    layout = ensure_state_dir(tmp_path / "state")
    save_config(layout, pkcs11_config())
    layout.config.write_text(layout.config.read_text() + 'pin = "1234"\n')
    with pytest.raises(AgentStateError, match="unknown or missing entries: pin"):
        load_config(layout)


def test_missing_config_says_enroll_first(tmp_path: Path) -> None:
    with pytest.raises(AgentStateError, match="not enrolled") as caught:
        load_config(StateLayout(tmp_path))
    assert "fleetward-agent enroll" in caught.value.hint


@pytest.mark.parametrize("url", ["http://fleet.example:8443", "https://user:pw@fleet.example",
                                 "https://fleet.example/?token=x", "ftp://x"])
def test_server_url_must_be_plain_https(url: str) -> None:
    with pytest.raises(InvalidInput):
        AgentConfig(server_url=url, device_id="d",
                    keystore=KeystoreConfig(kind="file", passphrase_file="/p"))


# --- crash recovery of a renewal -----------------------------------------------------------


def test_crash_after_new_certificate_stored_before_key_swap_is_finished(tmp_path: Path) -> None:
    pki = Pki.create()
    layout, keystore = enrolled_file_state(tmp_path / "state", pki)
    new_key = keystore.create_pending()
    new_cert = pki.leaf(new_key.public_key(), "dev-1")
    write_atomic(layout.pending_cert, certs_to_pem([new_cert]), 0o644)  # then: power cut
    recover_interrupted(layout, keystore)
    assert load_certificate_file(layout.cert) == new_cert
    assert same_public_key(keystore.private_key().public_key(), new_key.public_key())
    assert not layout.pending_cert.exists() and not layout.pending_key.exists()


def test_crash_after_key_swap_before_certificate_swap_is_finished(tmp_path: Path) -> None:
    pki = Pki.create()
    layout, keystore = enrolled_file_state(tmp_path / "state", pki)
    new_key = keystore.create_pending()
    new_cert = pki.leaf(new_key.public_key(), "dev-1")
    write_atomic(layout.pending_cert, certs_to_pem([new_cert]), 0o644)
    keystore.commit_pending()  # then: power cut (cert.pem still the old one)
    assert not same_public_key(keystore.private_key().public_key(),
                               load_certificate_file(layout.cert).public_key())
    recover_interrupted(layout, keystore)
    assert load_certificate_file(layout.cert) == new_cert
    assert same_public_key(keystore.private_key().public_key(), new_cert.public_key())


def test_a_pending_certificate_for_no_key_of_ours_is_dropped(tmp_path: Path) -> None:
    pki = Pki.create()
    layout, keystore = enrolled_file_state(tmp_path / "state", pki)
    old = load_certificate_file(layout.cert)
    stray = pki.leaf(ec.generate_private_key(ec.SECP256R1()).public_key(), "dev-1")
    write_atomic(layout.pending_cert, certs_to_pem([stray]), 0o644)
    recover_interrupted(layout, keystore)
    assert load_certificate_file(layout.cert) == old
    assert not layout.pending_cert.exists()


def test_enrolled_state_files_have_safe_modes(tmp_path: Path) -> None:
    layout, _ = enrolled_file_state(tmp_path / "state", Pki.create())
    assert mode(layout.root) == 0o700
    for secret in (layout.key, layout.passphrase, layout.config):
        assert mode(secret) == 0o600, secret
    assert layout.key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    leftovers = [p.name for p in layout.root.iterdir() if p.name.endswith((".new", ".tmp"))]
    assert leftovers == []
    assert os.access(layout.cert, os.R_OK)
