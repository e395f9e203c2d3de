"""Configuration: TOML + env overrides, and clear errors for anything unknown."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetward.config import Settings, load_settings, render_settings
from fleetward.errors import ConfigurationError


def test_round_trip_of_rendered_settings(tmp_path: Path) -> None:
    settings = Settings(tmp_path)
    (tmp_path / "fleetward.toml").write_text(render_settings(settings))
    assert load_settings(tmp_path, env={}) == settings


def test_environment_overrides_file(tmp_path: Path) -> None:
    (tmp_path / "fleetward.toml").write_text('[listeners]\npublic_url = "http://a:1"\n')
    settings = load_settings(tmp_path, env={"FLEETWARD_PUBLIC_URL": "http://b:2",
                                            "FLEETWARD_DATABASE_URL": "postgresql://x/y"})
    assert settings.listeners.public_url == "http://b:2"
    assert settings.database_url == "postgresql://x/y"


def test_default_database_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    assert load_settings(tmp_path, env={}).database_url == f"sqlite:///{tmp_path}/fleetward.db"


@pytest.mark.parametrize(("text", "message"), [
    ("[nonsense]\nx = 1\n", "unknown section"),
    ("[ca]\ndevice_validity_dayz = 3\n", "unknown key"),
    ('[ca]\ndevice_validity_days = "many"\n', "must be int"),
    ("[listeners]\nadmin_port = true\n", "must be int"),
    ("[ca\n", "not valid TOML"),
])
def test_bad_configuration_is_refused_with_a_hint(tmp_path: Path, text: str,
                                                  message: str) -> None:
    (tmp_path / "fleetward.toml").write_text(text)
    with pytest.raises(ConfigurationError) as caught:
        load_settings(tmp_path, env={})
    assert message in caught.value.message
    assert caught.value.hint
