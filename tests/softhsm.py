"""A SoftHSM2 token directory for one test module, with every token it uses initialised.

SoftHSM2 reads ``SOFTHSM2_CONF`` and lists its tokens once, in C_Initialize, and
python-pkcs11 initialises a module once per process (see tests/integration/
test_pkcs11_ca.py). So a module initialises all its tokens first, then points this
process at them (``softhsm_tokens``); a module whose token only subprocesses use
initialises them without touching this process (``init_tokens``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest

from tests.conftest import need_service

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass(frozen=True)
class SoftHsmTokens:
    conf: Path  # what SOFTHSM2_CONF must name
    tokendir: Path
    pin: str  # the user PIN of every token
    pin_file: Path  # the PIN and a newline, mode 0600


def init_tokens(root: Path, labels: Sequence[str]) -> SoftHsmTokens:
    """Write a SoftHSM2 config under *root* and initialise a token per label (each with
    the same user PIN and a random SO PIN). Only ``softhsm2-util`` sees the config: this
    process's environment and PKCS#11 library are left alone."""
    util = shutil.which("softhsm2-util")
    if util is None or not Path(SOFTHSM_MODULE).exists():
        need_service(f"SoftHSM2 (softhsm2-util and {SOFTHSM_MODULE})")
    tokendir = root / "tokens"
    tokendir.mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokendir}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    pin = secrets.token_hex(4)
    pin_file = root / "pin"
    pin_file.write_text(pin + "\n")
    pin_file.chmod(0o600)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    for label in labels:
        subprocess.run([str(util), "--init-token", "--free", "--label", label,
                        "--so-pin", secrets.token_hex(8), "--pin", pin],
                       check=True, capture_output=True, timeout=30, env=env)
    return SoftHsmTokens(conf, tokendir, pin, pin_file)


@contextmanager
def softhsm_tokens(root: Path, labels: Sequence[str]) -> Iterator[SoftHsmTokens]:
    """``init_tokens``, then ``SOFTHSM2_CONF`` set in this process until the block ends
    and SoftHSM2 re-initialised on it: if an earlier test module already loaded the
    module (python-pkcs11 keeps one per process), C_Finalize + C_Initialize makes
    SoftHSM2 read this config and these tokens."""
    tokens = init_tokens(root, labels)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(tokens.conf))
        pkcs11.lib(SOFTHSM_MODULE).reinitialize()
        yield tokens
