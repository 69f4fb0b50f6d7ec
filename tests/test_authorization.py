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
    # `public` too: Hypha's app controller calls workers from there (as root); the worker
    # itself checks which workspaces' apps it starts.
    assert service["config"]["authorized_workspaces"] == ["lab-a", "lab-b", "public"]
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
    # The server's app controller starts apps for the workspace the worker checked.
    assert _request("victim-ws", {"workspace": "victim-ws"}, from_server=True).workspace == (
        "victim-ws"
    )


def test_only_the_server_chooses_where_app_files_come_from():
    for key in ("app_files_base_url", "server_url"):
        with pytest.raises(ConfigError, match="only be set by the Hypha server"):
            _request("ws-b", {key: "http://127.0.0.1:1/steal", "app_id": "x"})
    # Even the app controller's URLs are rebuilt from the worker's own server: the
    # starter of an app can overwrite any config key through Hypha's additional_kwargs.
    trusted = _request(
        "ws-a",
        {"app_id": "x", "app_files_base_url": "http://evil/ws-a/artifacts/x/files"},
        from_server=True,
    )
    assert trusted.app_files.base_url == "http://hypha.local/ws-a/artifacts/x/files"


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
        _request("ws-b", {"id": "ws-a/client"}, from_server=True)
    assert _request("ws-a", {"id": "ws-a/c"}, from_server=True)


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


def test_a_public_worker_keeps_its_list_to_itself(tmp_path):
    # Hypha refuses `authorized_workspaces` on a public service (the in-server worker's
    # default), so the worker enforces CONDA_AUTHORIZED_WORKSPACES alone there.
    settings = Settings(
        cache_dir=tmp_path / "c",
        working_dir=tmp_path / "w",
        visibility="public",
        authorized_workspaces=("lab-a",),
    )
    service = CondaWorker(settings).service_definition()
    assert "authorized_workspaces" not in service["config"]


async def test_a_protected_standalone_worker_serves_its_own_workspace_only(tmp_path):
    settings = Settings(cache_dir=tmp_path / "c", working_dir=tmp_path / "w", workspace="ws-a")
    worker = CondaWorker(settings)
    assert await worker.list_sessions(context=context("ws-a")) == []
    with pytest.raises(WorkspaceNotAuthorizedError, match="'ws-b' may not use"):
        await worker.list_sessions(context=context("ws-b"))
    listed = CondaWorker(settings.model_copy(update={"authorized_workspaces": ("lab-a",)}))
    assert await listed.list_sessions(context=context("lab-a")) == []
    assert await listed.list_sessions(context=context("ws-a")) == [], "its own stays allowed"


async def test_only_the_app_controller_acts_for_another_workspace(tmp_path):
    worker = CondaWorker(Settings(cache_dir=tmp_path / "c", working_dir=tmp_path / "w"))
    from hypha_conda_plugin.worker import Caller

    mallory = Caller.from_context(context("mallory-ws"))
    assert await worker._owner(mallory, {"workspace": "victim-ws"}) == "mallory-ws"
    controller = Caller.from_context(context("public", user="root"))
    with pytest.raises(Exception, match="token"):  # it must prove the app's workspace
        await worker._owner(controller, {"workspace": "victim-ws", "token": "forged"})


async def test_the_in_server_worker_registers_and_enforces_its_list(session_tmp, offline_channel):
    # Public (the in-server default) with CONDA_AUTHORIZED_WORKSPACES: Hypha refuses the
    # list on a public service, so the worker must register without it and check it.
    from hypha_rpc import connect_to_server

    from hypha_conda_plugin.local_server import LocalServer

    server = LocalServer(
        session_tmp / "listed-in-server",
        s3=False,
        server_apps=False,
        plugin_env={
            "CONDA_AUTHORIZED_WORKSPACES": "lab-a",
            "CONDA_CHANNEL_ALIAS": offline_channel.alias_url,
        },
    )
    async with server:  # waits until public/conda-worker is registered
        for workspace, allowed in (("lab-a", True), ("lab-b", False)):
            token = await server.user_token(workspace)
            api = await connect_to_server(
                {"server_url": server.url, "workspace": workspace, "token": token}
            )
            try:
                worker = await api.get_service("public/conda-worker")
                if allowed:
                    assert await worker.list_sessions() == []
                else:
                    with pytest.raises(Exception, match="'lab-b' may not use this worker"):
                        await worker.list_sessions()
            finally:
                await api.disconnect()


async def test_list_environments_is_for_the_worker_s_administrators(tmp_path):
    """In-server: Hypha's admins (root, the admin role). Standalone: also the users of the
    workspace the worker is registered in (they hold its token)."""
    dirs = {"cache_dir": tmp_path / "c", "working_dir": tmp_path / "w"}
    in_server = CondaWorker(Settings(**dirs), in_server=True)
    standalone = CondaWorker(Settings(workspace="lab-a", **dirs))
    admin = {"ws": "ws-x", "user": {"id": "u1", "roles": ["admin"]}}
    for worker in (in_server, standalone):
        assert await worker.list_environments(context=context("public", user="root")) == []
        assert await worker.list_environments(context=admin) == []
        with pytest.raises(WorkspaceNotAuthorizedError, match="administrators"):
            await worker.list_environments(context=context("lab-b"))
    assert await standalone.list_environments(context=context("lab-a")) == []
    with pytest.raises(WorkspaceNotAuthorizedError, match="administrators"):
        await in_server.list_environments(context=context("lab-a"))
