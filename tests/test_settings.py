"""One settings object: in-server CONDA_* variables, standalone flags and HYPHA_* variables."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hypha_conda_plugin.settings import Settings, SettingsError


def test_in_server_defaults_register_publicly_as_conda_worker():
    settings = Settings.from_env({})
    assert settings.service_id == "conda-worker"
    assert settings.visibility == "public"
    assert settings.cache_dir == Path("~/.hypha_conda_cache").expanduser().resolve()
    # Stable, so a worker restarted after a crash sweeps what the dead one left.
    assert settings.working_dir == Settings.from_env({}).working_dir
    assert settings.working_dir.name == f"hypha_conda_sessions_{os.getuid()}"
    assert settings.authorized_workspaces == ()


def test_in_server_variables(tmp_path):
    settings = Settings.from_env(
        {
            "CONDA_WORKING_DIR": str(tmp_path / "w"),
            "CONDA_CACHE_DIR": str(tmp_path / "c"),
            "CONDA_AUTHORIZED_WORKSPACES": " ws1, ws2 ,,",
            "CONDA_SERVICE_ID": "my-worker",
            "CONDA_CHANNEL_ALIAS": str(tmp_path / "channel"),
            "CONDA_EXECUTE_TIMEOUT": "30",
        }
    )
    assert settings.working_dir == tmp_path / "w"
    assert settings.cache_dir == tmp_path / "c"
    assert settings.authorized_workspaces == ("ws1", "ws2")
    assert settings.service_id == "my-worker"
    # A folder becomes a file URL ending in '/', as a channel alias must.
    assert settings.channel_alias == (tmp_path / "channel").as_uri() + "/"
    assert settings.default_execute_timeout == 30


def test_bad_value_names_the_setting():
    with pytest.raises(SettingsError, match="build_timeout"):
        Settings.from_env({"CONDA_BUILD_TIMEOUT": "soon"})
    with pytest.raises(SettingsError, match="visibility"):
        Settings.from_env({"CONDA_VISIBILITY": "everyone"})


def test_cli_flags_win_over_hypha_variables(tmp_path):
    env = {
        "HYPHA_SERVER_URL": "http://env",
        "HYPHA_WORKSPACE": "env-ws",
        "HYPHA_TOKEN": "t",
        "HYPHA_SERVICE_ID": "env-id",
        "HYPHA_CACHE_DIR": str(tmp_path / "env-cache"),
    }
    settings = Settings.from_cli(
        {"server_url": "http://flag", "service_id": "flag-id", "visibility": None}, env
    )
    assert settings.server_url == "http://flag"
    assert settings.workspace == "env-ws"
    assert settings.service_id == "flag-id"
    assert settings.visibility == "protected"  # standalone default
    assert settings.cache_dir == tmp_path / "env-cache"


def test_cli_missing_required_settings_are_all_named():
    with pytest.raises(SettingsError) as caught:
        Settings.from_cli({}, {})
    message = str(caught.value)
    for name in ("--server-url", "HYPHA_SERVER_URL", "--workspace", "--token"):
        assert name in message
