"""docs/threat-model.md names, for every control, the test that fails if the control
breaks. A renamed or deleted test would leave a threat with no evidence while the
document still claims one: this test makes that drift fail the suite."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THREAT_MODEL = ROOT / "docs" / "threat-model.md"
FOLDERS = {"i": ROOT / "tests" / "integration", "u": ROOT / "tests" / "unit"}
# `i/test_file.py`, `u/test_file.py::test_name`, or `…::test_name` (same file as before).
REFERENCE = re.compile(r"`(?:([iu])/(test_\w+\.py)|…)(?:::(\w+))?`")


def references(text: str) -> list[tuple[Path, str | None]]:
    found: list[tuple[Path, str | None]] = []
    current: Path | None = None
    for match in REFERENCE.finditer(text):
        folder, file_name, test_name = match.groups()
        if file_name:
            current = FOLDERS[folder] / file_name
        elif current is None:
            raise AssertionError(f"{match.group(0)} has no file before it")
        if file_name or test_name:
            found.append((current, test_name))
    return found


def test_every_threat_row_cites_evidence() -> None:
    rows = [line for line in THREAT_MODEL.read_text().splitlines()
            if re.match(r"^\| T\d+ \|", line)]
    assert len(rows) >= 20
    for row in rows:
        assert references(row), f"no test cited: {row[:80]}"


@pytest.mark.parametrize("path,test_name", references(THREAT_MODEL.read_text()),
                         ids=lambda value: getattr(value, "name", value))
def test_cited_test_exists(path: Path, test_name: str | None) -> None:
    assert path.is_file(), f"{path.relative_to(ROOT)} is cited but does not exist"
    if test_name is not None:
        assert re.search(rf"^\s*(async )?def {test_name}\(", path.read_text(), re.M), (
            f"{path.relative_to(ROOT)}::{test_name} is cited but does not exist")


def test_the_parser_sees_a_missing_test() -> None:
    """Negative control: a citation of a test that does not exist is reported."""
    [(path, name)] = references("`u/test_threat_model.py::test_that_was_renamed`")
    with pytest.raises(AssertionError, match="cited but does not exist"):
        test_cited_test_exists(path, name)
