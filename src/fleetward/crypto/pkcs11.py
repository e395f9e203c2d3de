"""PKCS#11 signer (python-pkcs11): the CA key is generated on the token and stays there.

The private key is created with CKA_SENSITIVE=true and CKA_EXTRACTABLE=false (PKCS#11
v2.40 §4.9), so neither Fleetward nor anyone with the PIN can read it out, and it can only
sign: every usage flag is spelled out (see ``PRIVATE_KEY_TEMPLATE``). Signing uses raw
CKM_ECDSA over a digest computed here, which every token supports (SoftHSM2 included).

``Pkcs11AesKey`` is the other kind of key kept here: an AES-256 key generated on the token
that only encrypts and decrypts (AES-GCM), the key-encryption key of crypto/kek.py.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from typing import Any, NoReturn

import pkcs11
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PrivateFormat,
    load_der_public_key,
)
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from fleetward.errors import ConfigurationError, KeyUnavailable

_CURVES: dict[str, ec.EllipticCurve] = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1()}

# A key pair that signs and verifies, nothing else. python-pkcs11 fills CKA_DECRYPT,
# CKA_UNWRAP, CKA_SIGN, CKA_DERIVE (private) and CKA_ENCRYPT, CKA_WRAP, CKA_VERIFY (public)
# from ``capabilities``, whose default for EC keys (pkcs11.defaults.DEFAULT_KEY_CAPABILITIES)
# is SIGN | VERIFY | DERIVE: a CA key that could also do ECDH. So the capabilities are
# given, and every usage flag is also set in the templates (PKCS#11 v2.40 §4.7-4.9).
_SIGN_ONLY = MechanismFlag.SIGN | MechanismFlag.VERIFY
PRIVATE_KEY_TEMPLATE: dict[Attribute, bool] = {
    Attribute.SIGN: True,
    Attribute.SIGN_RECOVER: False,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.PRIVATE: True,
    Attribute.TOKEN: True,
}
PUBLIC_KEY_TEMPLATE: dict[Attribute, bool] = {
    Attribute.VERIFY: True,
    Attribute.VERIFY_RECOVER: False,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
    Attribute.DERIVE: False,
    Attribute.TOKEN: True,
}
# Flags fixed for the key's life: C_SetAttributeValue is refused (CKR_ACTION_PROHIBITED on
# SoftHSM2), and so is C_CopyObject, which could otherwise make a modifiable copy
# (PKCS#11 v2.40 §4.4: CKA_MODIFIABLE may be changed while copying).
LOCKED_TEMPLATE: dict[Attribute, bool] = {Attribute.MODIFIABLE: False, Attribute.COPYABLE: False}

# PKCS#11 §5.4: C_Initialize once per process, and login state is shared by every
# session of one application on a token, so one logged-in session per token is kept
# and all signers on that token share it (and its lock: sessions are not thread-safe,
# PKCS#11 §5.1.5).
_LIBRARIES: dict[str, Any] = {}
_SESSIONS: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}
# A cached session is already logged in, so a later caller's PIN is checked against the
# one that logged in (keyed MAC, never the PIN itself): otherwise any PIN would do.
_PIN_MACS: dict[tuple[str, str], bytes] = {}
_PIN_MAC_KEY = secrets.token_bytes(32)
_LIBRARY_LOCK = threading.Lock()


def _library(module: str) -> Any:
    with _LIBRARY_LOCK:
        if module not in _LIBRARIES:
            try:
                _LIBRARIES[module] = pkcs11.lib(module)
            except (RuntimeError, OSError, pkcs11.PKCS11Error) as exc:
                raise ConfigurationError(
                    f"cannot load PKCS#11 module {module}: {exc}",
                    hint="check the module path (e.g. /usr/lib/softhsm/libsofthsm2.so)",
                ) from exc
        return _LIBRARIES[module]


class _TokenECKey(ec.EllipticCurvePrivateKey):
    """An EC private key whose operations run on the token; export is impossible."""

    def __init__(self, signer: Pkcs11Signer) -> None:
        self._signer = signer

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            digest = bytes(data)
        else:
            hasher = hashes.Hash(algorithm)
            hasher.update(data)
            digest = hasher.finalize()
        raw = self._signer.sign_digest(digest)
        half = len(raw) // 2
        return utils.encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._signer.public_key()

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._signer.public_key().curve

    @property
    def key_size(self) -> int:
        return self.curve.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        self._refuse()

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        self._refuse()

    def private_bytes(
        self, encoding: Encoding, format: PrivateFormat, encryption_algorithm: Any
    ) -> bytes:
        self._refuse()

    def __copy__(self) -> _TokenECKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _TokenECKey:
        return self

    @staticmethod
    def _refuse() -> NoReturn:
        raise KeyUnavailable("this key lives on a PKCS#11 token and cannot be exported")


class Pkcs11Signer:
    """A signing key on a PKCS#11 token, found by token label and key label."""

    def __init__(
        self,
        session: tuple[Any, threading.Lock],
        private: Any,
        public_key: ec.EllipticCurvePublicKey,
        ref: dict[str, str],
    ) -> None:
        self._session, self._lock = session
        self._private = private
        self._public_key = public_key
        self._ref = ref
        self._proxy = _TokenECKey(self)

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return self._proxy

    @property
    def key_ref(self) -> dict[str, str]:
        return dict(self._ref)

    @property
    def token_private_key(self) -> Any:
        """The python-pkcs11 key object (for attribute checks)."""
        return self._private

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def sign_digest(self, digest: bytes) -> bytes:
        with self._lock:
            try:
                return bytes(self._private.sign(digest, mechanism=Mechanism.ECDSA))
            except pkcs11.PKCS11Error as exc:
                raise KeyUnavailable(f"the PKCS#11 token refused to sign: {exc!r}") from exc

    @classmethod
    def generate(
        cls,
        *,
        module: str,
        token_label: str,
        key_label: str,
        pin: str,
        curve: str = "secp256r1",
        modifiable: bool = False,
    ) -> Pkcs11Signer:
        """Generate a non-extractable, sign-only EC key pair on the token.

        With ``modifiable=False`` (the default, e.g. CA keys) no attribute of either object
        can be changed or copied later. ``modifiable=True`` is for a caller that must still
        set an attribute the key's value decides (the agent keystore's CKA_ID).

        Raises:
            ConfigurationError: a key with that label already exists, or the curve is unknown.
        """
        if curve not in _CURVES:
            raise ConfigurationError(
                f"unsupported curve {curve}", hint="use secp256r1 or secp384r1"
            )
        opened = _open_session(module, token_label, pin)
        session = opened[0]
        if list(
            session.get_objects(
                {Attribute.LABEL: key_label, Attribute.CLASS: ObjectClass.PRIVATE_KEY}
            )
        ):
            raise ConfigurationError(
                f"token {token_label!r} already holds a key labelled {key_label!r}",
                hint="choose another key label or reuse the existing CA",
            )
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True
        )
        locked = {} if modifiable else LOCKED_TEMPLATE
        public, private = params.generate_keypair(
            store=True,
            label=key_label,
            capabilities=_SIGN_ONLY,
            public_template={**PUBLIC_KEY_TEMPLATE, **locked},
            private_template={**PRIVATE_KEY_TEMPLATE, **locked},
        )
        ref = {
            "backend": "pkcs11",
            "module": module,
            "token_label": token_label,
            "key_label": key_label,
        }
        return cls(opened, private, _public_key_of(public), ref)

    @classmethod
    def open(cls, *, module: str, token_label: str, key_label: str, pin: str) -> Pkcs11Signer:
        """Open an existing key pair by label.

        Raises:
            KeyUnavailable: no such key on the token, or the PIN is wrong.
        """
        opened = _open_session(module, token_label, pin)
        session = opened[0]
        try:
            private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=key_label)
            public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=key_label)
        except (pkcs11.NoSuchKey, pkcs11.MultipleObjectsReturned) as exc:
            raise KeyUnavailable(
                f"no unique key {key_label!r} on token {token_label!r}",
                hint="check the token and key labels stored with the CA",
            ) from exc
        ref = {
            "backend": "pkcs11",
            "module": module,
            "token_label": token_label,
            "key_label": key_label,
        }
        return cls(opened, private, _public_key_of(public), ref)


def _pin_mac(pin: str) -> bytes:
    return hmac.new(_PIN_MAC_KEY, pin.encode(), hashlib.sha256).digest()


def _open_session(module: str, token_label: str, pin: str) -> tuple[Any, threading.Lock]:
    with _LIBRARY_LOCK:
        cached = _SESSIONS.get((module, token_label))
        logged_in_with = _PIN_MACS.get((module, token_label))
    if cached is not None:
        if logged_in_with is None or not hmac.compare_digest(logged_in_with, _pin_mac(pin)):
            raise KeyUnavailable(
                f"cannot log in to token {token_label!r}: the PIN differs from the one this "
                "process logged in with",
                hint="check the PIN",
            )
        return cached
    lib = _library(module)
    try:
        token = lib.get_token(token_label=token_label)
    except (pkcs11.NoSuchToken, pkcs11.MultipleTokensReturned) as exc:
        raise KeyUnavailable(
            f"no unique PKCS#11 token labelled {token_label!r}",
            hint="initialise it, e.g. softhsm2-util --init-token --free --label LABEL",
        ) from exc
    try:
        session = token.open(user_pin=pin, rw=True)
    except pkcs11.PKCS11Error as exc:
        raise KeyUnavailable(
            f"cannot log in to token {token_label!r}: {exc!r}", hint="check the PIN"
        ) from exc
    with _LIBRARY_LOCK:
        _PIN_MACS.setdefault((module, token_label), _pin_mac(pin))
        return _SESSIONS.setdefault((module, token_label), (session, threading.Lock()))


def _public_key_of(public: Any) -> ec.EllipticCurvePublicKey:
    key = load_der_public_key(encode_ec_public_key(public))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyUnavailable("the token's public key is not an EC key")
    return key


# --- AES keys on the token (the credential key-encryption key) ----------------------------

AES_KEY_BYTES = 32  # AES-256
GCM_NONCE_BYTES = 12  # 96-bit IVs: the length GCM is specified for (NIST SP 800-38D §5.2.1.1)
GCM_TAG_BITS = 128  # the full tag (NIST SP 800-38D §5.2.1.2)

# An AES key that encrypts and decrypts data and does nothing else: not a wrapping key
# (it cannot carry other keys off the token), not a MAC or derivation key. Sensitive and
# unextractable (PKCS#11 v2.40 §4.10): its value never leaves the token, not even wrapped.
_ENCRYPT_ONLY = MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT
SECRET_KEY_TEMPLATE: dict[Attribute, bool] = {
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.PRIVATE: True,
    Attribute.TOKEN: True,
}


class Pkcs11AesKey:
    """An AES-256 key on a PKCS#11 token that encrypts with AES-GCM on the token."""

    def __init__(self, session: tuple[Any, threading.Lock], key: Any, ref: dict[str, str]) -> None:
        self._session, self._lock = session
        self._key = key
        self._ref = ref

    @property
    def key_ref(self) -> dict[str, str]:
        """Where the key is (module, token and key labels); never a secret."""
        return dict(self._ref)

    @property
    def token_key(self) -> Any:
        """The python-pkcs11 key object (for attribute checks)."""
        return self._key

    def __repr__(self) -> str:
        return f"Pkcs11AesKey({self._ref['token_label']!r}, {self._ref['key_label']!r})"

    @classmethod
    def open_or_create(
        cls, *, module: str, token_label: str, key_label: str, pin: str
    ) -> Pkcs11AesKey:
        """Open the AES key labelled ``key_label``, or generate it on the token.

        A key found under the label is used only if the token reports every attribute of
        ``SECRET_KEY_TEMPLATE`` and ``LOCKED_TEMPLATE`` (an exportable key planted under
        our label would otherwise be used silently).

        Args:
            module: path of the PKCS#11 module, e.g. ``/usr/lib/softhsm/libsofthsm2.so``.
            token_label: the token's label.
            key_label: the key object's label (CKA_LABEL).
            pin: the user PIN.

        Returns:
            The key.

        Raises:
            KeyUnavailable: no such token, wrong PIN, or several keys with that label.
            ConfigurationError: the token cannot do AES-GCM, or the key found under the
                label is not an AES-256 key with exactly these attributes.
        """
        opened = _open_session(module, token_label, pin)
        session, lock = opened
        ref = {"backend": "pkcs11", "module": module, "token_label": token_label,
               "key_label": key_label}
        with lock:
            try:
                if Mechanism.AES_GCM not in session.token.slot.get_mechanisms():
                    raise ConfigurationError(
                        f"PKCS#11 token {token_label!r} cannot do AES-GCM (CKM_AES_GCM)",
                        hint='use [tokens] kek_backend = "file", or a token that supports '
                             "CKM_AES_GCM")
                found = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                                  Attribute.LABEL: key_label}))
                if len(found) > 1:
                    raise KeyUnavailable(
                        f"token {token_label!r} holds {len(found)} keys labelled {key_label!r}",
                        hint="delete the extra ones; only one key may carry the label")
                if found:
                    key = found[0]
                    _check_secret_key(key, token_label, key_label)
                else:
                    key = session.generate_key(
                        KeyType.AES, AES_KEY_BYTES * 8, label=key_label, store=True,
                        capabilities=_ENCRYPT_ONLY,
                        template={**SECRET_KEY_TEMPLATE, **LOCKED_TEMPLATE})
            except pkcs11.PKCS11Error as exc:
                raise KeyUnavailable(
                    f"cannot open or create the AES key {key_label!r} on token "
                    f"{token_label!r}: {exc!r}",
                    hint="check the token (is it read-write and logged in?)") from exc
        return cls(opened, key, ref)

    def encrypt_gcm(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AES-GCM on the token: ciphertext || 16-byte tag.

        Raises:
            KeyUnavailable: the token refused.
        """
        with self._lock:
            try:
                return bytes(self._key.encrypt(
                    plaintext, mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS)))
            except pkcs11.PKCS11Error as exc:
                raise KeyUnavailable(f"the PKCS#11 token refused to encrypt: {exc!r}") from exc

    def decrypt_gcm(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        """Check the tag and decrypt on the token.

        Raises:
            KeyUnavailable: the tag does not match (altered data, other key or other
                associated data) or the token refused.
        """
        with self._lock:
            try:
                return bytes(self._key.decrypt(
                    ciphertext, mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS)))
            except pkcs11.PKCS11Error as exc:
                # SoftHSM2 reports a wrong tag as CKR_GENERAL_ERROR, others as
                # CKR_ENCRYPTED_DATA_INVALID: either way nothing is returned.
                raise KeyUnavailable(
                    "the PKCS#11 token could not decrypt: altered data or another key",
                    hint="the data was not encrypted with this token key") from exc


def _check_secret_key(key: Any, token_label: str, key_label: str) -> None:
    expected: dict[Attribute, Any] = {**SECRET_KEY_TEMPLATE, **LOCKED_TEMPLATE,
                                      Attribute.KEY_TYPE: KeyType.AES,
                                      Attribute.VALUE_LEN: AES_KEY_BYTES}
    for attribute, value in expected.items():
        if key[attribute] != value:
            raise ConfigurationError(
                f"the key {key_label!r} on token {token_label!r} has {attribute.name} = "
                f"{key[attribute]!r}, expected {value!r}",
                hint="it was not made by Fleetward: delete it or choose another key label")
