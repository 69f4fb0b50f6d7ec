"""Standalone workers as operators start them, serving Hypha's app controller.

A real Hypha server without the in-server worker; workers are `python -m
hypha_conda_plugin` processes registered in their workspaces with the default
(protected) visibility. Hypha's app controller calls workers from the `public`
workspace, so this is where a worker that "serves apps" and "stays closed to other
workspaces" must both hold.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
from hypha_rpc import connect_to_server

from hypha_conda_plugin.local_server import LocalServer
from tests.standalone import standalone_worker

APP_MAIN = """
import os
from hypha_rpc import connect_to_server

print("standalone app running as", os.environ["HYPHA_WORKSPACE"])
_server = await connect_to_server({
    "server_url": os.environ["HYPHA_SERVER_URL"],
    "workspace": os.environ["HYPHA_WORKSPACE"],
    "client_id": os.environ["HYPHA_CLIENT_ID"],
    "token": os.environ["HYPHA_TOKEN"],
})
await _server.register_service({"id": "default", "triple": lambda x: x * 3})
"""

MANIFEST = {
    "name": "Tripler",
    "type": "conda-jupyter-kernel",
    "version": "0.1.0",
    "entry_point": "main.py",
    "dependencies": ["python", "numpy"],
    "channels": ["conda-forge"],
}


@pytest.fixture(scope="module")
async def server(session_tmp: Path, offline_channel):
    """A Hypha server with server apps and S3 but no in-server worker: every app runs
    on the standalone workers (nothing in `public` to fall back on)."""
    local = LocalServer(session_tmp / "standalone-server", in_server_worker=False)
    async with local:
        yield local


@pytest.fixture(scope="module")
async def tokens(server: LocalServer) -> dict[str, str]:
    return {ws: await server.user_token(ws) for ws in ("ws-a", "ws-b", "ws-c", "ws-p")}


def _worker(server, tokens, workspace, service_id, folder, worker_dirs, channel, *extra):
    return standalone_worker(
        server.url,
        workspace,
        tokens[workspace],
        service_id,
        folder=folder,
        cache_dir=worker_dirs["cache"],
        channel_alias=channel.alias_url,
        extra_args=extra,
    )


async def _client(server: LocalServer, tokens: dict[str, str], workspace: str):
    return await connect_to_server(
        {"server_url": server.url, "workspace": workspace, "token": tokens[workspace]}
    )


async def _install(controller, app_id: str, main: str = APP_MAIN, **kwargs):
    return await controller.install(
        manifest=dict(MANIFEST, name=app_id),
        files=[{"name": "main.py", "content": main, "format": "text"}],
        app_id=app_id,
        overwrite=True,
        wait_for_service=False,
        stage=True,
        **kwargs,
    )


async def test_default_protected_worker_serves_its_workspaces_apps(
    server, tokens, session_tmp, worker_dirs, offline_channel
):
    folder = session_tmp / "standalone-a"
    async with _worker(server, tokens, "ws-a", "w-a", folder, worker_dirs, offline_channel) as w:
        api = await _client(server, tokens, "ws-a")
        try:
            # The owner's workspace reaches it directly.
            assert await (await api.get_service(w.service_id)).list_sessions() == []
            controller = await api.get_service("public/server-apps")
            app = await _install(controller, "tripler")
            session = await controller.start(
                app["id"], wait_for_service="default", stage=True, timeout=180
            )
            try:
                assert session["worker_id"] == w.service_id
                tripler = await api.get_service(f"{session['id']}:default")
                assert await tripler.triple(14) == 42
                logs = await controller.get_logs(session["id"])
                text = str(logs)
                assert "standalone app running as ws-a" in text
            finally:
                await controller.stop(session["id"])
            worker = await api.get_service(w.service_id)
            assert all(s["session_id"] != session["id"] for s in await worker.list_sessions())
        finally:
            await api.disconnect()


async def test_protected_worker_stays_closed_to_other_workspaces(
    server, tokens, session_tmp, worker_dirs, offline_channel
):
    folder = session_tmp / "standalone-closed"
    async with (
        _worker(server, tokens, "ws-a", "w-closed", folder, worker_dirs, offline_channel) as a,
        _worker(server, tokens, "ws-b", "w-b", folder, worker_dirs, offline_channel) as b,
    ):
        api_b = await _client(server, tokens, "ws-b")
        try:
            # Direct calls from another workspace: Hypha refuses the protected service.
            with pytest.raises(Exception, match=r"(?i)permission|denied|not found"):
                worker_a = await api_b.get_service(a.service_id)
                await worker_a.list_sessions()

            controller = await api_b.get_service("public/server-apps")
            # Installing in ws-b with ws-a's worker named: refused by the worker.
            with pytest.raises(Exception, match="'ws-b' may not run on this worker"):
                await _install(controller, "sneaky", worker_id=a.service_id)
            # An app of ws-b (compiled by ws-b's own worker) started on ws-a's worker.
            app = await _install(controller, "sneaky", worker_id=b.service_id)
            with pytest.raises(Exception, match="'ws-b' may not run on this worker"):
                await controller.start(
                    app["id"], worker_id=a.service_id, stage=True, wait_for_service=False
                )
            # ... and claiming ws-a through additional_kwargs: the app's token says ws-b.
            with pytest.raises(Exception, match="token was issued for workspace 'ws-b'"):
                await controller.start(
                    app["id"],
                    worker_id=a.service_id,
                    stage=True,
                    wait_for_service=False,
                    additional_kwargs={"workspace": "ws-a", "id": "ws-a/forged"},
                )
            # Nothing of ws-b's ran on ws-a's worker.
            api_a = await _client(server, tokens, "ws-a")
            try:
                assert await (await api_a.get_service(a.service_id)).list_sessions() == []
            finally:
                await api_a.disconnect()
            # The same app runs on ws-b's own worker.
            session = await controller.start(
                app["id"], stage=True, wait_for_service="default", timeout=180
            )
            assert session["worker_id"] == b.service_id
            await controller.stop(session["id"])
        finally:
            await api_b.disconnect()
    assert "Traceback" not in a.log(), a.log()


async def test_authorized_workspaces_open_a_worker_to_listed_workspaces_only(
    server, tokens, session_tmp, worker_dirs, offline_channel
):
    folder = session_tmp / "standalone-listed"
    async with _worker(
        server,
        tokens,
        "ws-a",
        "w-listed",
        folder,
        worker_dirs,
        offline_channel,
        "--authorized-workspaces",
        "ws-b",
    ) as listed:
        api_b = await _client(server, tokens, "ws-b")
        api_c = await _client(server, tokens, "ws-c")
        try:
            # ws-b is listed: it calls the worker directly and runs its apps there.
            worker = await api_b.get_service(listed.service_id)
            assert await worker.list_sessions() == []
            controller = await api_b.get_service("public/server-apps")
            app = await _install(controller, "listed-app", worker_id=listed.service_id)
            session = await controller.start(
                app["id"],
                worker_id=listed.service_id,
                stage=True,
                wait_for_service="default",
                timeout=180,
            )
            assert [s["workspace"] for s in await worker.list_sessions()] == ["ws-b"]
            await controller.stop(session["id"])
            # ws-c is not.
            with pytest.raises(Exception, match=r"(?i)permission|denied|not found"):
                other = await api_c.get_service(listed.service_id)
                await other.list_sessions()
            controller_c = await api_c.get_service("public/server-apps")
            with pytest.raises(Exception, match="'ws-c' may not run on this worker"):
                await _install(controller_c, "listed-app", worker_id=listed.service_id)
        finally:
            await api_b.disconnect()
            await api_c.disconnect()


async def test_select_min_get_load_spreads_apps_evenly_over_three_workers(
    server, tokens, session_tmp, worker_dirs, offline_channel
):
    folder = session_tmp / "standalone-placement"
    names = ("p1", "p2", "p3")
    async with (
        _worker(server, tokens, "ws-p", names[0], folder, worker_dirs, offline_channel) as w1,
        _worker(server, tokens, "ws-p", names[1], folder, worker_dirs, offline_channel) as w2,
        _worker(server, tokens, "ws-p", names[2], folder, worker_dirs, offline_channel) as w3,
    ):
        workers = {w.service_id for w in (w1, w2, w3)}
        api = await _client(server, tokens, "ws-p")
        controller = await api.get_service("public/server-apps")
        started = []
        try:
            loads = [await (await api.get_service(w)).get_load() for w in sorted(workers)]
            assert all(0 <= load < 1 for load in loads), loads  # idle: memory share only
            for index in range(6):
                app = await _install(controller, f"placed-{index}", main="print('placed')")
                session = await controller.start(
                    app["id"],
                    stage=True,
                    wait_for_service=False,
                    timeout=180,
                    worker_selection_mode="select:min:get_load",
                )
                started.append(session)
            placed = collections.Counter(s["worker_id"] for s in started)
            assert placed == {w: 2 for w in workers}, placed
            for w in workers:
                load = await (await api.get_service(w)).get_load()
                assert 2 <= load < 3, (w, load)  # two idle sessions + memory share
        finally:
            for session in started:
                await controller.stop(session["id"])
            await api.disconnect()
