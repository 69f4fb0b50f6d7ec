"""Who may use the worker: CONDA_AUTHORIZED_WORKSPACES and session ownership.

The worker is called in-process here with the same ``context`` dicts Hypha attaches to
each call (the end-to-end tests cover ownership through a real server).
"""

from __future__ import annotations

import pytest

from hypha_conda_plugin.errors import (
    AnonymousCallerError,
    ConfigError,
    WorkspaceNotAuthorizedError,
)
from hypha_conda_plugin.settings import Settings
from hypha_conda_plugin.worker import CondaWorker


def context(workspace: str, user: str = "someone") -> dict:
    return {"ws": workspace, "from": f"{workspace}/client", "user": {"id": user}}


@pytest.fixture
def worker(tmp_path) -> CondaWorker:
    settings = Settings(
        cache_dir=tmp_path / "cache",
        working_dir=tmp_path / "work",
        authorized_workspaces=("lab-a", "lab-b"),
    )
    return CondaWorker(settings)


async def test_unlisted_workspace_is_refused_with_a_clear_message(worker):
    with pytest.raises(WorkspaceNotAuthorizedError, match="'intruder' may not use"):
        await worker.start({"manifest": {"dependencies": []}}, context=context("intruder"))
    with pytest.raises(WorkspaceNotAuthorizedError, match="CONDA_AUTHORIZED_WORKSPACES"):
        await worker.list_sessions(context=context("intruder"))


async def test_listed_workspaces_and_the_server_itself_are_allowed(worker):
    assert await worker.list_sessions(context=context("lab-a")) == []
    assert await worker.list_sessions(context=context("public", user="root")) == []


def test_service_carries_the_list_for_hypha_to_enforce_on_protected_services(worker):
    service = worker.service_definition()
    assert service["config"]["authorized_workspaces"] == ["lab-a", "lab-b"]
    assert service["config"]["require_context"] is True
    assert service["type"] == "server-app-worker"
    assert service["supported_types"] == ["conda-jupyter-kernel"]


def _request(caller_ws: str, config: dict, *, from_server: bool = False):
    from hypha_conda_plugin.start_request import StartRequest

    settings = Settings(cache_dir="/tmp/unused-cache", working_dir="/tmp/unused-work")
    return StartRequest.parse(
        {"manifest": {"dependencies": []}, **config},
        workspace=caller_ws,
        from_server=from_server,
        server_url="http://hypha.local",
        settings=settings,
    )


def test_a_user_cannot_claim_another_workspace_in_the_config():
    with pytest.raises(ConfigError, match="always belong to the caller's workspace"):
        _request("mallory-ws", {"workspace": "victim-ws"})
    # The server's app controller starts apps on behalf of the workspace it names.
    assert _request("public", {"workspace": "victim-ws"}, from_server=True).workspace == (
        "victim-ws"
    )


def test_only_the_server_chooses_where_app_files_come_from():
    for key in ("app_files_base_url", "server_url"):
        with pytest.raises(ConfigError, match="only be set by the Hypha server"):
            _request("ws-b", {key: "http://127.0.0.1:1/steal", "app_id": "x"})
    trusted = _request(
        "public",
        {"workspace": "ws-a", "app_files_base_url": "http://h/ws-a/artifacts/x/files"},
        from_server=True,
    )
    assert trusted.app_files.base_url == "http://h/ws-a/artifacts/x/files"


def test_a_direct_start_reads_apps_of_its_own_workspace_from_the_worker_server():
    own = _request("ws-b", {"artifact_id": "ws-b/my-app", "token": "t"})
    assert own.app_files.base_url == "http://hypha.local/ws-b/artifacts/my-app/files"
    assert own.app_files.token == "t"
    bare = _request("ws-b", {"app_id": "my-app"})
    assert bare.app_files.base_url == "http://hypha.local/ws-b/artifacts/my-app/files"
    with pytest.raises(ConfigError, match="belongs to workspace 'ws-a'"):
        _request("ws-b", {"artifact_id": "ws-a/private-app"})


def test_session_ids_with_a_slash_are_the_servers_own():
    with pytest.raises(ConfigError, match="reserved for the server"):
        _request("ws-b", {"id": "ws-a/client"})
    with pytest.raises(ConfigError, match="names workspace 'ws-a'"):
        _request("public", {"id": "ws-a/client", "workspace": "ws-b"}, from_server=True)
    assert _request("public", {"id": "ws-a/c", "workspace": "ws-a"}, from_server=True)


async def test_no_context_is_not_root(worker):
    with pytest.raises(WorkspaceNotAuthorizedError, match="no caller context"):
        await worker.list_sessions(context=None)
    with pytest.raises(WorkspaceNotAuthorizedError, match="no caller context"):
        await worker.compile({"dependencies": []}, [], context={})


async def test_anonymous_callers_are_refused_unless_admitted(tmp_path):
    anonymous = {"ws": "ws-anon", "user": {"id": "anonymouz-x", "is_anonymous": True}}
    closed = CondaWorker(Settings(cache_dir=tmp_path / "c", working_dir=tmp_path / "w"))
    with pytest.raises(AnonymousCallerError, match="Sign in"):
        await closed.start({"manifest": {"dependencies": []}}, context=anonymous)
    opened = CondaWorker(
        Settings(cache_dir=tmp_path / "c", working_dir=tmp_path / "w", allow_anonymous=True)
    )
    assert await opened.list_sessions(context=anonymous) == []
