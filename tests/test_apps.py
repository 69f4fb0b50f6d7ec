"""Apps launched by Hypha's own app controller (server-apps) run on this worker: the
entry point is read from the app's files in the artifact manager and run in the kernel,
and the app can connect back to Hypha with the credentials the worker hands it."""

from __future__ import annotations

from pathlib import Path

import pytest

APP_MAIN = """
import os
from hypha_rpc import connect_to_server

print("app main running in", os.getcwd())
ANSWER = 42

_server = await connect_to_server({
    "server_url": os.environ["HYPHA_SERVER_URL"],
    "workspace": os.environ["HYPHA_WORKSPACE"],
    "client_id": os.environ["HYPHA_CLIENT_ID"],
    "token": os.environ["HYPHA_TOKEN"],
})
await _server.register_service({"id": "default", "double": lambda x: x * 2})
"""


def _manifest(entry_point: str = "main.py") -> dict:
    return {
        "name": "Doubler",
        "type": "conda-jupyter-kernel",
        "version": "0.1.0",
        "entry_point": entry_point,
        "dependencies": ["python", "numpy"],
        "channels": ["conda-forge"],
    }


async def test_app_entry_point_runs_and_registers_a_service(client, conda_worker):
    controller = await client.get_service("public/server-apps")
    app = await controller.install(
        manifest=_manifest(),
        files=[{"name": "main.py", "content": APP_MAIN, "format": "text"}],
        app_id="doubler",
        overwrite=True,
        wait_for_service=False,
        stage=True,
    )
    session = await controller.start(app["id"], wait_for_service="default", stage=True, timeout=120)
    try:
        doubler = await client.get_service(f"{session['id']}:default")
        assert await doubler.double(21) == 42
        # The worker sees the session as the app's workspace's own.
        result = await conda_worker.execute(session["id"], "print(ANSWER)")
        assert result["outputs"][0]["text"] == "42\n"
        logs = await conda_worker.get_logs(session["id"], type="stdout")
        assert any("app main running in" in item["content"] for item in logs["items"])
    finally:
        await controller.stop(session["id"])
    with pytest.raises(Exception, match="No session"):
        await conda_worker.execute(session["id"], "1")


async def test_missing_entry_point_file_is_an_error_naming_it(client):
    controller = await client.get_service("public/server-apps")
    app = await controller.install(
        manifest=_manifest("does_not_exist.py"),
        files=[{"name": "main.py", "content": "print(1)", "format": "text"}],
        app_id="no-entry",
        overwrite=True,
        wait_for_service=False,
        stage=True,
    )
    with pytest.raises(Exception, match=r"does_not_exist\.py"):
        await controller.start(app["id"], wait_for_service=False, stage=True, timeout=120)


async def test_entry_point_that_raises_fails_the_start_with_its_error(client, conda_worker):
    controller = await client.get_service("public/server-apps")
    app = await controller.install(
        manifest=_manifest(),
        files=[
            {
                "name": "main.py",
                "content": "x = 1\nraise RuntimeError('boom in main')\n",
                "format": "text",
            }
        ],
        app_id="raises",
        overwrite=True,
        wait_for_service=False,
        stage=True,
    )
    with pytest.raises(Exception, match="RuntimeError: boom in main"):
        await controller.start(app["id"], wait_for_service=False, stage=True, timeout=120)
    # The failed session keeps no kernel and no folder behind.
    failed = [
        s
        for s in await conda_worker.list_sessions()
        if s["status"] == "failed" and s["app_id"] == "raises"
    ]
    assert failed and failed[0]["kernel_pid"] is None
    assert not Path(failed[0]["working_dir"]).exists()
