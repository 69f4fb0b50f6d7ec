"""Who may use the worker: CONDA_AUTHORIZED_WORKSPACES and session ownership.

The worker is called in-process here with the same ``context`` dicts Hypha attaches to
each call (the end-to-end tests cover ownership through a real server).
"""

from __future__ import annotations

import pytest

from hypha_conda_plugin.errors import WorkspaceNotAuthorizedError
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


async def test_a_user_cannot_claim_another_workspace_in_the_config(tmp_path):
    worker = CondaWorker(Settings(cache_dir=tmp_path / "c", working_dir=tmp_path / "w"))
    owner = worker._owner  # the rule, applied to what start() receives
    from hypha_conda_plugin.worker import Caller

    mallory = Caller.from_context(context("mallory-ws"))
    server = Caller.from_context(context("public", user="root"))
    assert owner(mallory, {"workspace": "victim-ws"}) == "mallory-ws"
    assert owner(server, {"workspace": "victim-ws"}) == "victim-ws"


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
