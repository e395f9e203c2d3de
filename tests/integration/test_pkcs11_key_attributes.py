"""Token keys can only sign: the usage and access flags read back from the token.

Threats: a CA (or device) key that the token would also use for ECDH (CKA_DERIVE),
decryption, unwrapping or signature recovery; python-pkcs11's default capabilities for EC
keys include DERIVE, so a template that only *adds* SIGN gets "sign, derive". And a PIN
holder who later flips such a flag (C_SetAttributeValue) or makes a modifiable copy
(C_CopyObject) of a CA key.

The CA keys are made by a real ``fleetward init --ca-key-backend pkcs11`` and read back
twice: by OpenSC's ``pkcs11-tool --list-objects`` (another PKCS#11 client, its own
words) and attribute by attribute through python-pkcs11. A key made with python-pkcs11's
defaults on the same token is the control: both readers do report its extra usages.

SoftHSM2 reads ``SOFTHSM2_CONF`` once per C_Initialize (see test_pkcs11_ca.py), so the
module fixture writes the config and initialises every token first.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from fleetward.agent.keystore import Pkcs11Keystore
from fleetward.agent.state import AgentConfig, KeystoreConfig, ensure_state_dir, save_config
from fleetward.crypto.pkcs11 import Pkcs11Signer
from tests.conftest import FLEETWARD, need_service
from tests.softhsm import SOFTHSM_MODULE as MODULE
from tests.softhsm import softhsm_tokens

pytestmark = pytest.mark.softhsm

CLI_TOKEN, LIB_TOKEN, AGENT_TOKEN = "fw-usage-cli", "fw-usage-lib", "fw-usage-agent"
CA_LABELS = ("fleetward-root-ca", "fleetward-issuing-ca")
CONTROL_LABEL = "control-python-pkcs11-defaults"


@dataclass(frozen=True)
class Token:
    pin: str


@pytest.fixture(scope="module", autouse=True)
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    with softhsm_tokens(tmp_path_factory.mktemp("softhsm-usage"),
                        (CLI_TOKEN, LIB_TOKEN, AGENT_TOKEN)) as tokens:
        yield Token(pin=tokens.pin)


@pytest.fixture(scope="module")
def cli_token(softhsm: Token, tmp_path_factory: pytest.TempPathFactory) -> str:
    """CLI_TOKEN after a real `fleetward init --ca-key-backend pkcs11`, plus the control key."""
    root = tmp_path_factory.mktemp("init")
    pin_file = root / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    pin_file.chmod(0o600)
    result = subprocess.run(
        [*FLEETWARD, "init", "--data-dir", str(root / "data"), "--public-url",
         "http://127.0.0.1:1", "--public-port", "1", "--admin-port", "2",
         "--ca-key-backend", "pkcs11", "--pkcs11-module", MODULE,
         "--pkcs11-token-label", CLI_TOKEN, "--pkcs11-pin-file", str(pin_file)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # The control: python-pkcs11's defaults for an EC pair (capabilities SIGN|VERIFY|DERIVE,
    # modifiable, copyable), made exportable as well.
    session = Pkcs11Signer.open(module=MODULE, token_label=CLI_TOKEN, key_label=CA_LABELS[0],
                                pin=softhsm.pin).token_private_key.session
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
        local=True)
    params.generate_keypair(store=True, label=CONTROL_LABEL, private_template={
        Attribute.SIGN: True, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
    return CLI_TOKEN


# --- read back by OpenSC's pkcs11-tool ----------------------------------------------------


def pkcs11_tool_objects(token_label: str, pin: str) -> dict[tuple[str, str], dict[str, set[str]]]:
    """`pkcs11-tool --list-objects` as {(kind, label): {"Usage": {...}, "Access": {...}}}."""
    tool = shutil.which("pkcs11-tool")
    if tool is None:
        need_service("OpenSC's pkcs11-tool (Debian package opensc)")
    result = subprocess.run([str(tool), "--module", MODULE, "--token-label", token_label,
                             "--login", "--pin", pin, "--list-objects"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    objects: dict[tuple[str, str], dict[str, set[str]]] = {}
    for block in re.split(r"\n(?=\S)", result.stdout.strip()):
        kind = block.split(";", 1)[0].strip()  # "Private Key Object" / "Public Key Object"
        fields = dict(re.findall(r"^\s+(\w+):\s*(.*?)\s*$", block, re.MULTILINE))
        if "label" in fields:
            objects[kind, fields["label"]] = {
                name: {word.strip() for word in fields.get(name, "").split(",") if word.strip()}
                for name in ("Usage", "Access")}
    return objects


MUST_ACCESS = {"sensitive", "always sensitive", "never extractable", "local"}


def test_pkcs11_tool_reads_ca_keys_as_sign_only_and_unexportable(
        softhsm: Token, cli_token: str) -> None:
    objects = pkcs11_tool_objects(cli_token, softhsm.pin)
    for label in CA_LABELS:
        private = objects["Private Key Object", label]
        assert private["Usage"] == {"sign"}, (label, private)
        assert private["Access"] >= MUST_ACCESS, (label, private)
        assert "extractable" not in private["Access"], (label, private)
        public = objects["Public Key Object", label]
        assert public["Usage"] == {"verify"}, (label, public)
    # Control, same token and parser: the defaults key does show derive and exportability.
    control = objects["Private Key Object", CONTROL_LABEL]
    assert control["Usage"] == {"sign", "derive"}, control
    assert "extractable" in control["Access"] and "sensitive" not in control["Access"], control


# --- read back through python-pkcs11 ------------------------------------------------------

PRIVATE_FLAGS = {
    Attribute.SIGN: True, Attribute.DERIVE: False, Attribute.DECRYPT: False,
    Attribute.UNWRAP: False, Attribute.SIGN_RECOVER: False, Attribute.SENSITIVE: True,
    Attribute.ALWAYS_SENSITIVE: True, Attribute.EXTRACTABLE: False,
    Attribute.NEVER_EXTRACTABLE: True, Attribute.LOCAL: True, Attribute.PRIVATE: True,
    Attribute.TOKEN: True,
}
PUBLIC_FLAGS = {
    Attribute.VERIFY: True, Attribute.VERIFY_RECOVER: False, Attribute.ENCRYPT: False,
    Attribute.WRAP: False, Attribute.DERIVE: False, Attribute.TOKEN: True,
}
LOCKED_FLAGS = {Attribute.MODIFIABLE: False, Attribute.COPYABLE: False}


def key_pair(token_label: str, label: str, pin: str) -> tuple[Any, Any]:
    private = Pkcs11Signer.open(module=MODULE, token_label=token_label, key_label=label,
                                pin=pin).token_private_key
    public = private.session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
    return private, public


def flags(obj: Any, wanted: dict[Attribute, bool]) -> dict[str, bool]:
    return {attribute.name: obj[attribute] for attribute in wanted}


def named(wanted: dict[Attribute, bool]) -> dict[str, bool]:
    return {attribute.name: value for attribute, value in wanted.items()}


@pytest.mark.parametrize("label", CA_LABELS)
def test_cli_ca_keys_are_sign_only_and_locked(softhsm: Token, cli_token: str,
                                              label: str) -> None:
    private, public = key_pair(cli_token, label, softhsm.pin)
    assert flags(private, PRIVATE_FLAGS | LOCKED_FLAGS) == named(PRIVATE_FLAGS | LOCKED_FLAGS)
    assert flags(public, PUBLIC_FLAGS | LOCKED_FLAGS) == named(PUBLIC_FLAGS | LOCKED_FLAGS)


def test_control_python_pkcs11_defaults_would_derive(softhsm: Token, cli_token: str) -> None:
    """The reads above can fail: python-pkcs11's own defaults give an EC key DERIVE."""
    private, _ = key_pair(cli_token, CONTROL_LABEL, softhsm.pin)
    assert private[Attribute.DERIVE] is True
    assert private[Attribute.MODIFIABLE] is True and private[Attribute.COPYABLE] is True


def test_generated_signer_key_is_sign_only_and_locked(softhsm: Token) -> None:
    """The same template without a subprocess: Pkcs11Signer.generate, read back directly."""
    signer = Pkcs11Signer.generate(module=MODULE, token_label=LIB_TOKEN, key_label="ca",
                                   pin=softhsm.pin)
    private, public = key_pair(LIB_TOKEN, "ca", softhsm.pin)
    assert flags(private, PRIVATE_FLAGS | LOCKED_FLAGS) == named(PRIVATE_FLAGS | LOCKED_FLAGS)
    assert flags(public, PUBLIC_FLAGS | LOCKED_FLAGS) == named(PUBLIC_FLAGS | LOCKED_FLAGS)
    assert signer.token_private_key[Attribute.DERIVE] is False


def test_locked_ca_key_refuses_to_gain_derive_or_be_copied(softhsm: Token,
                                                           cli_token: str) -> None:
    private, public = key_pair(cli_token, "fleetward-issuing-ca", softhsm.pin)
    for obj in (private, public):
        with pytest.raises(pkcs11.PKCS11Error):  # CKR_ACTION_PROHIBITED on SoftHSM2
            obj[Attribute.DERIVE] = True
        assert obj[Attribute.DERIVE] is False
    with pytest.raises(pkcs11.PKCS11Error):  # a modifiable copy would lift the lock
        private.copy({Attribute.MODIFIABLE: True, Attribute.TOKEN: False})
    # Controls on the same token: the defaults key does change and copy, so the refusals
    # above are the lock, not a failing call.
    control, _ = key_pair(cli_token, CONTROL_LABEL, softhsm.pin)
    control[Attribute.DERIVE] = False
    assert control[Attribute.DERIVE] is False
    copy = control.copy({Attribute.TOKEN: False, Attribute.LABEL: "control-copy"})
    copy.destroy()


def test_agent_device_key_is_sign_only(softhsm: Token, tmp_path: Path) -> None:
    """Device keys use the same template (left modifiable: the keystore sets CKA_ID)."""
    layout = ensure_state_dir(tmp_path / "state")
    pin_file = tmp_path / "state" / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    pin_file.chmod(0o600)
    config = AgentConfig(server_url="https://127.0.0.1:9", device_id="dev-usage",
                         keystore=KeystoreConfig(kind="pkcs11", module=MODULE,
                                                 token_label=AGENT_TOKEN,
                                                 pin_file=str(pin_file)))
    save_config(layout, config)
    keystore = Pkcs11Keystore(layout, config)
    keystore.create_pending()
    label = keystore.config.keystore.pending_key_label
    assert label is not None
    private, public = key_pair(AGENT_TOKEN, label, softhsm.pin)
    assert flags(private, PRIVATE_FLAGS) == named(PRIVATE_FLAGS)
    assert flags(public, PUBLIC_FLAGS) == named(PUBLIC_FLAGS)
    assert private[Attribute.ID] == public[Attribute.ID] != b""  # why it stays modifiable
    usage = pkcs11_tool_objects(AGENT_TOKEN, softhsm.pin)["Private Key Object", label]
    assert usage["Usage"] == {"sign"}, usage
