"""The device key: encrypted on disk, or generated on a PKCS#11 token and never leaving it.

Threats: a device key written in clear (or readable by others), or opened with a wrong
passphrase; a token key that the PIN holder can read out (CKA_VALUE), wrap out
(CKA_EXTRACTABLE) or that was ever sensitive=false; a CSR "signed by the token" that was
in fact signed by a software key; a rotated-out key left on the token, or a new key not
recorded anywhere; key pairs without their own CKA_ID, which OpenSSL's pkcs11 engine
mismatches (current private key + pending public key) once two keys share a token.

SoftHSM2 reads ``SOFTHSM2_CONF`` once per C_Initialize, so the module fixture writes the
config, initialises the token and re-initialises the library (see test_pkcs11_ca.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from fleetward.agent.errors import AgentStateError
from fleetward.agent.est_client import build_csr
from fleetward.agent.keystore import FileKeystore, Pkcs11Keystore, same_public_key
from fleetward.agent.state import (
    AgentConfig,
    KeystoreConfig,
    StateLayout,
    ensure_state_dir,
    generate_passphrase_file,
    load_config,
    save_config,
)
from fleetward.crypto.pkcs11 import Pkcs11Signer
from fleetward.errors import KeyUnavailable
from tests.softhsm import SOFTHSM_MODULE as MODULE
from tests.softhsm import softhsm_tokens

TOKEN = "fw-agent-unit"  # labels are per process: one token for this module only
WRONG_PIN_TOKEN = "fw-agent-unit-pin"


# --- file keystore -------------------------------------------------------------------------


def file_keystore(root: Path, passphrase: bytes | None = None) -> FileKeystore:
    layout = ensure_state_dir(root)
    if passphrase is None:
        generate_passphrase_file(layout.passphrase)
    else:
        layout.passphrase.write_bytes(passphrase + b"\n")
        layout.passphrase.chmod(0o600)
    return FileKeystore(layout, layout.passphrase)


def test_file_key_is_encrypted_pkcs8_and_0600(tmp_path: Path) -> None:
    keystore = file_keystore(tmp_path / "state")
    key = keystore.create_pending()
    keystore.commit_pending()
    path = StateLayout(tmp_path / "state").key
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(TypeError):  # no passphrase: cannot be read
        serialization.load_pem_private_key(data, password=None)
    assert same_public_key(keystore.private_key().public_key(), key.public_key())


def test_file_key_with_a_wrong_passphrase_is_refused(tmp_path: Path) -> None:
    keystore = file_keystore(tmp_path / "state", b"right passphrase")
    keystore.create_pending()
    keystore.commit_pending()
    layout = StateLayout(tmp_path / "state")
    layout.passphrase.write_bytes(b"wrong passphrase\n")
    with pytest.raises(KeyUnavailable, match="wrong passphrase") as caught:
        FileKeystore(layout, layout.passphrase).private_key()
    assert str(layout.passphrase) in caught.value.hint
    assert "device key" in caught.value.message
    layout.passphrase.write_bytes(b"right passphrase\n")  # negative control
    FileKeystore(layout, layout.passphrase).private_key()


def test_file_mtls_context_with_a_wrong_passphrase_is_refused(tmp_path: Path) -> None:
    from tests.unit.test_agent_est_client import Pki
    from tests.unit.test_agent_state import enrolled_file_state

    layout, keystore = enrolled_file_state(tmp_path / "state", Pki.create())
    keystore.mtls_transport("https://127.0.0.1:9").close()  # loads cert + key
    layout.passphrase.write_bytes(b"wrong\n")
    with pytest.raises(KeyUnavailable, match="cannot load the device certificate"):
        FileKeystore(layout, layout.passphrase).mtls_transport("https://127.0.0.1:9")


def test_file_rotation_keeps_the_old_key_until_commit(tmp_path: Path) -> None:
    keystore = file_keystore(tmp_path / "state")
    first = keystore.create_pending()
    keystore.commit_pending()
    second = keystore.create_pending()
    assert same_public_key(keystore.private_key().public_key(), first.public_key())
    pending = keystore.pending_key()
    assert pending is not None and same_public_key(pending.public_key(), second.public_key())
    keystore.discard_pending()
    assert keystore.pending_key() is None
    assert same_public_key(keystore.private_key().public_key(), first.public_key())
    third = keystore.create_pending()
    keystore.commit_pending()
    assert same_public_key(keystore.private_key().public_key(), third.public_key())


# --- PKCS#11 keystore ----------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    conf: Path
    pin: str


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    with softhsm_tokens(tmp_path_factory.mktemp("softhsm-agent"),
                        (TOKEN, WRONG_PIN_TOKEN)) as tokens:
        yield Token(tokens.conf, tokens.pin)


def token_keystore(root: Path, token: Token, token_label: str = TOKEN,
                   pin: str | None = None) -> Pkcs11Keystore:
    layout = ensure_state_dir(root)
    pin_file = root / "pin"
    pin_file.write_text((pin or token.pin) + "\n")
    pin_file.chmod(0o600)
    config = AgentConfig(server_url="https://127.0.0.1:9", device_id="dev-hsm",
                         keystore=KeystoreConfig(kind="pkcs11", module=MODULE,
                                                 token_label=token_label,
                                                 pin_file=str(pin_file)))
    save_config(layout, config)
    return Pkcs11Keystore(layout, config)


def labels_on_token(token: Token, keystore: Pkcs11Keystore) -> set[str]:
    current = keystore.key_label or keystore.config.keystore.pending_key_label
    assert current is not None
    session = keystore.token_key(current).private.session  # type: ignore[attr-defined]
    return {o[Attribute.LABEL] for o in session.get_objects({Attribute.CLASS:
                                                             ObjectClass.PRIVATE_KEY})}


def test_token_key_is_generated_sensitive_and_non_extractable(
        tmp_path: Path, softhsm: Token) -> None:
    keystore = token_keystore(tmp_path / "state", softhsm)
    keystore.create_pending()
    label = keystore.config.keystore.pending_key_label
    assert label is not None
    private = keystore.token_key(label).private
    assert private[Attribute.SENSITIVE] is True  # type: ignore[index]
    assert private[Attribute.EXTRACTABLE] is False  # type: ignore[index]
    assert private[Attribute.ALWAYS_SENSITIVE] is True  # type: ignore[index]
    assert private[Attribute.NEVER_EXTRACTABLE] is True  # type: ignore[index]
    with pytest.raises(pkcs11.AttributeSensitive):
        private[Attribute.VALUE]  # type: ignore[index]


def test_negative_control_an_extractable_token_key_can_be_read(
        tmp_path: Path, softhsm: Token) -> None:
    """Shows the CKA_VALUE check above can fail: SoftHSM2 does hand out a key made
    sensitive=false, extractable=true."""
    keystore = token_keystore(tmp_path / "state", softhsm)
    keystore.create_pending()
    label = keystore.config.keystore.pending_key_label
    assert label is not None
    session = keystore.token_key(label).private.session  # type: ignore[attr-defined]
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
        local=True)
    _, weak = params.generate_keypair(store=False, private_template={
        Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True, Attribute.SIGN: True})
    assert len(weak[Attribute.VALUE]) == 32


def test_token_key_refuses_export_through_the_cryptography_interface(
        tmp_path: Path, softhsm: Token) -> None:
    keystore = token_keystore(tmp_path / "state", softhsm)
    key = keystore.create_pending()
    with pytest.raises(KeyUnavailable, match="cannot be exported"):
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())


def test_csr_is_signed_on_the_token_by_the_token_key(tmp_path: Path, softhsm: Token) -> None:
    keystore = token_keystore(tmp_path / "state", softhsm)
    key = keystore.create_pending()
    label = keystore.config.keystore.pending_key_label
    assert label is not None
    csr = build_csr("dev-hsm", key)
    assert csr.is_signature_valid
    assert same_public_key(csr.public_key(), keystore.token_key(label).public_key)
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)


def test_every_key_pair_has_its_own_cka_id(tmp_path: Path, softhsm: Token) -> None:
    keystore = token_keystore(tmp_path / "state", softhsm)
    key = keystore.create_pending()
    label = keystore.config.keystore.pending_key_label
    assert label is not None
    private = keystore.token_key(label).private
    session = private.session  # type: ignore[attr-defined]
    public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
    point = key.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint)
    assert private[Attribute.ID] == public[Attribute.ID] == hashlib.sha256(point).digest()  # type: ignore[index]
    keystore.commit_pending()
    assert f"id=%{hashlib.sha256(point).digest()[0]:02x}" in keystore.key_uri()


def test_pending_label_is_recorded_and_rotation_destroys_the_old_key(
        tmp_path: Path, softhsm: Token) -> None:
    root = tmp_path / "state"
    keystore = token_keystore(root, softhsm)
    keystore.create_pending()
    first = load_config(StateLayout(root)).keystore.pending_key_label
    assert first is not None  # on disk, not only in memory
    keystore.commit_pending()
    keystore.finish()
    assert load_config(StateLayout(root)).keystore.key_label == first
    keystore.create_pending()
    second = load_config(StateLayout(root)).keystore.pending_key_label
    assert second is not None and second != first
    assert {first, second} <= labels_on_token(softhsm, keystore)
    keystore.commit_pending()
    saved = load_config(StateLayout(root)).keystore
    assert (saved.key_label, saved.retired_key_label) == (second, first)
    assert first in labels_on_token(softhsm, keystore)  # kept until finish()
    keystore.finish()
    assert first not in labels_on_token(softhsm, keystore)
    assert load_config(StateLayout(root)).keystore.retired_key_label is None


def test_discarding_a_pending_key_removes_it_from_the_token(
        tmp_path: Path, softhsm: Token) -> None:
    keystore = token_keystore(tmp_path / "state", softhsm)
    keystore.create_pending()
    keystore.commit_pending()
    keystore.create_pending()
    pending = keystore.config.keystore.pending_key_label
    assert pending is not None and pending in labels_on_token(softhsm, keystore)
    keystore.discard_pending()
    assert pending not in labels_on_token(softhsm, keystore)
    assert keystore.config.keystore.pending_key_label is None


def test_a_wrong_pin_is_refused(tmp_path: Path, softhsm: Token) -> None:
    keystore = token_keystore(tmp_path / "state", softhsm, WRONG_PIN_TOKEN, pin="00000000")
    with pytest.raises(KeyUnavailable, match="cannot log in"):
        keystore.create_pending()
    # negative control: the right PIN works
    right = token_keystore(tmp_path / "other", softhsm, WRONG_PIN_TOKEN)
    right.create_pending()


def test_the_keystore_reference_never_holds_the_pin(tmp_path: Path, softhsm: Token) -> None:
    root = tmp_path / "state"
    keystore = token_keystore(root, softhsm)
    keystore.create_pending()
    keystore.commit_pending()
    assert softhsm.pin not in StateLayout(root).config.read_text()


def test_a_pin_file_others_can_read_is_refused(tmp_path: Path, softhsm: Token) -> None:
    keystore = token_keystore(tmp_path / "state", softhsm)
    (tmp_path / "state" / "pin").chmod(0o644)
    with pytest.raises(AgentStateError, match="readable by other users"):
        keystore.create_pending()


def test_pkcs11_signer_keys_without_agent_id_share_the_empty_id(
        tmp_path: Path, softhsm: Token) -> None:
    """Why _set_key_id exists: Pkcs11Signer.generate leaves CKA_ID empty, so two pairs on
    one token are indistinguishable by ID."""
    a = Pkcs11Signer.generate(module=MODULE, token_label=TOKEN, key_label="bare-a",
                              pin=softhsm.pin)
    b = Pkcs11Signer.generate(module=MODULE, token_label=TOKEN, key_label="bare-b",
                              pin=softhsm.pin)
    ids = {bytes(k.token_private_key[Attribute.ID]) for k in (a, b)}
    assert ids == {b""}
