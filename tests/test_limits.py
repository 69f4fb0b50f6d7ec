"""Limits a shared server relies on, tried against real servers: session quotas, the
memory limit of a kernel, the idle timeout, and what a killed worker leaves behind."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from hypha_conda_plugin.local_server import LocalServer
from tests.conftest import _connect, worker_server

pytestmark = pytest.mark.timeout(400)

MANIFEST = {"dependencies": ["python"], "channels": ["conda-forge"]}


def _stdout(result: dict) -> str:
    return "".join(o["text"] for o in result["outputs"] if o["type"] == "stream")


@pytest.fixture(scope="module")
async def limited(offline_channel, tmp_path_factory) -> AsyncIterator[dict]:
    folder = tmp_path_factory.mktemp("limits")
    server = worker_server(
        folder,
        offline_channel,
        CONDA_MAX_SESSIONS="3",
        CONDA_MAX_SESSIONS_PER_WORKSPACE="2",
        CONDA_SESSION_MEMORY_LIMIT="1500M",
        CONDA_KERNEL_POOL_SIZE="0",
        CONDA_MAX_CONCURRENT_BUILDS="1",
    )
    async with server:
        alice = await _connect(server, "ws-alice")
        bob = await _connect(server, "ws-bob")
        yield {
            "server": server,
            "alice": await alice.get_service("public/conda-worker"),
            "bob": await bob.get_service("public/conda-worker"),
        }
        await alice.disconnect()
        await bob.disconnect()


async def test_session_quotas_refuse_with_the_setting_to_change(limited):
    alice, bob = limited["alice"], limited["bob"]
    started: list[tuple] = []
    try:
        for name in ("a1", "a2"):
            started.append((alice, await alice.start({"id": name, "manifest": MANIFEST})))
        with pytest.raises(Exception, match="CONDA_MAX_SESSIONS_PER_WORKSPACE=2"):
            await alice.start({"id": "a3", "manifest": MANIFEST})
        started.append((bob, await bob.start({"id": "b1", "manifest": MANIFEST})))
        with pytest.raises(Exception, match="CONDA_MAX_SESSIONS=3"):
            await bob.start({"id": "b2", "manifest": MANIFEST})
        # A refused start changes nothing; once a session stops there is room again.
        assert len(await alice.list_sessions()) == 2
        worker, session = started.pop(0)
        await worker.stop(session)
        started.append((bob, await bob.start({"id": "b2", "manifest": MANIFEST})))
    finally:
        for worker, session in started:
            await worker.stop(session)


async def test_builds_beyond_the_limit_wait_their_turn_and_say_so(limited):
    alice, bob = limited["alice"], limited["bob"]
    messages: dict[str, list[str]] = {"numpy": [], "pandas": []}

    async def start(worker, package: str) -> str:
        return await worker.start(
            {
                "id": f"build-{package}",
                "manifest": {"dependencies": ["python", package]},
                "progress_callback": lambda m: messages[package].append(m["message"]),
            }
        )

    started = await asyncio.gather(start(alice, "numpy"), start(bob, "pandas"))
    try:
        waited = [
            package
            for package, said in messages.items()
            if any("CONDA_MAX_CONCURRENT_BUILDS" in m for m in said)
        ]
        assert len(waited) == 1, messages  # one built, the other waited, then built
        assert all(any("built in" in m for m in said) for said in messages.values())
    finally:
        await alice.stop(started[0])
        await bob.stop(started[1])


async def test_a_cell_past_the_memory_limit_fails_cleanly(limited):
    alice = limited["alice"]
    session = await alice.start({"id": "hungry", "manifest": MANIFEST})
    try:
        result = await alice.execute(session, "x = bytearray(2 * 1024**3)", config={"timeout": 60})
        assert result["status"] == "error"
        assert result["error"]["ename"] == "MemoryError"
        alive = await alice.execute(session, "y = bytearray(50 * 1024**2); print('alive')")
        assert _stdout(alive) == "alive\n"
        await alice.restart(session)
        after = await alice.execute(session, "print('restarted')")
        assert _stdout(after) == "restarted\n"
    finally:
        await alice.stop(session)


async def test_an_idle_session_is_stopped_and_its_logs_say_why(offline_channel, tmp_path):
    server = worker_server(
        tmp_path, offline_channel, CONDA_IDLE_TIMEOUT="2", CONDA_KERNEL_POOL_SIZE="0"
    )
    async with server:
        api = await _connect(server, "ws-idle")
        worker = await api.get_service("public/conda-worker")
        session = await worker.start({"id": "sleepy", "manifest": MANIFEST})
        pid = (await worker.get_session_info(session))["kernel_pid"]
        busy = await worker.execute(session, "import time; time.sleep(3); print('kept')")
        assert _stdout(busy) == "kept\n"  # a running cell is not idle
        for _ in range(100):
            info = await worker.get_session_info(session)
            if info["status"] == "stopped":
                break
            await asyncio.sleep(0.1)
        assert info["status"] == "stopped"
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        logs = await worker.get_logs(session, type="info")
        assert any("without an execute (CONDA_IDLE_TIMEOUT)" in i["content"] for i in logs["items"])
        with pytest.raises(Exception, match="without an execute"):
            await worker.execute(session, "1")
        # The id can be used again.
        again = await worker.start({"id": "sleepy", "manifest": MANIFEST})
        await worker.stop(again)
        await api.disconnect()


def _processes_under(folder: Path) -> list[psutil.Process]:
    """Processes whose working directory lies under ``folder``: everything the worker
    run started there (it ran with ``folder/cwd`` as its own working directory)."""
    found = []
    for process in psutil.process_iter(["cwd", "status"]):
        cwd = process.info["cwd"] or ""
        if cwd.startswith(str(folder)) and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


async def _standalone(server: LocalServer, folder: Path, token: str, channel: str):
    env = {
        **os.environ,
        "CONDA_CHANNEL_ALIAS": channel,
        "CONDA_KERNEL_POOL_SIZE": "0",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    (folder / "cwd").mkdir(exist_ok=True)
    log = (folder / "worker.log").open("ab")
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hypha_conda_plugin",
        "--server-url",
        server.url,
        "--workspace",
        "ws-crash",
        "--token",
        token,
        "--service-id",
        "crash-worker",
        "--cache-dir",
        str(folder / "cache"),
        "--working-dir",
        str(folder / "sessions"),
        cwd=folder / "cwd",
        env=env,
        stdout=log,
        stderr=log,
    )


async def _service(api, within: float = 60.0):
    deadline = time.monotonic() + within
    while True:
        try:
            return await api.get_service("crash-worker")
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def test_a_killed_worker_leaves_nothing_running_and_the_next_one_sweeps(
    offline_channel, tmp_path
):
    server = LocalServer(tmp_path / "server", s3=False, server_apps=False)
    async with server:
        token = await server.user_token("ws-crash")
        api = await _connect(server, "ws-crash")
        worker_process = await _standalone(server, tmp_path, token, offline_channel.alias_url)
        try:
            worker = await _service(api)
            ready = await worker.start({"id": "ready", "manifest": MANIFEST})
            escaped = await worker.execute(
                ready,
                "import subprocess\n"
                "subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
                "print('started')",
            )
            assert _stdout(escaped) == "started\n"
            building = asyncio.Event()
            pending = asyncio.ensure_future(
                worker.start(
                    {
                        "id": "building",
                        "manifest": {"dependencies": ["python", "pandas"]},
                        "progress_callback": lambda m: (
                            m.get("stage", "").startswith("build") and building.set()
                        ),
                    }
                )
            )
            await asyncio.wait_for(building.wait(), 120)
            assert len(_processes_under(tmp_path)) >= 3  # the worker, a kernel, a build
        finally:
            worker_process.send_signal(signal.SIGKILL)
            await worker_process.wait()
        pending.cancel()
        deadline = time.monotonic() + 10
        while _processes_under(tmp_path) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert [p.cmdline() for p in _processes_under(tmp_path)] == []

        envs = tmp_path / "cache" / "envs"
        runs_before = [p.name for p in (tmp_path / "sessions").iterdir() if p.is_dir()]
        assert runs_before  # the dead run's folder is still there...
        restarted = await _standalone(server, tmp_path, token, offline_channel.alias_url)
        try:
            worker = await _service(api)
            messages: list[str] = []
            session = await worker.start(
                {"manifest": MANIFEST, "progress_callback": lambda m: messages.append(m["message"])}
            )
            await worker.stop(session)
            # ...and the next worker swept it, and the half-built environment, but
            # reused the ready one.
            assert not any((tmp_path / "sessions" / name).exists() for name in runs_before)
            assert any("Reusing cached environment" in m for m in messages), messages
            ready_envs = [p for p in envs.iterdir() if p.is_dir() and not p.name.startswith(".")]
            assert len(ready_envs) == 1
        finally:
            restarted.send_signal(signal.SIGTERM)
            await restarted.wait()
        await api.disconnect()
