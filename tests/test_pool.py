"""Warm kernels through a real server: a pooled session is exactly a fresh one.

The server here keeps one warm kernel per environment (``CONDA_KERNEL_POOL_SIZE=1``) so
the tests can tell a pooled start (its progress says "Using a warm kernel") from a fresh
one, and allows three kernels in all, so the pool must make room for sessions.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import _connect, worker_server

pytestmark = pytest.mark.timeout(300)

MANIFEST = {"dependencies": ["python"], "channels": ["conda-forge"]}


def _stdout(result: dict) -> str:
    return "".join(o["text"] for o in result["outputs"] if o["type"] == "stream")


def _kernels(working_dir: Path) -> set[int]:
    """Host pids of the kernels (their Python, not the sandbox's bwrap processes around
    it) running under the working folder."""
    found = set()
    for process in psutil.process_iter(["cmdline", "cwd"]):
        cmdline, cwd = process.info["cmdline"] or [], process.info["cwd"] or ""
        if (
            any(part.endswith("connection.json") for part in cmdline)
            and os.path.basename(cmdline[0]).startswith("python")
            and cwd.startswith(str(working_dir))
        ):
            found.add(process.pid)
    return found


async def _wait_for(condition, within: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.1)


async def _warm(worker, count: int, within: float = 60.0) -> None:
    """Wait until ``count`` warm kernels wait in the pool (all environments)."""
    deadline = asyncio.get_running_loop().time() + within
    while sum((await worker.get_status())["warm_kernels"].values()) != count:
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting for the pool"
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
async def pool_server(offline_channel, tmp_path_factory) -> AsyncIterator[dict]:
    folder = tmp_path_factory.mktemp("pool")
    server = worker_server(
        folder, offline_channel, CONDA_KERNEL_POOL_SIZE="1", CONDA_MAX_SESSIONS="3"
    )
    async with server:
        api = await _connect(server, "ws-pool")
        yield {
            "server": server,
            "worker": await api.get_service("public/conda-worker"),
            "working_dir": folder / "sessions",
        }
        await api.disconnect()


async def _start(worker, session_id: str) -> tuple[str, list[str]]:
    messages: list[str] = []
    session = await worker.start(
        {
            "id": session_id,
            "manifest": MANIFEST,
            "progress_callback": lambda m: messages.append(m["message"]),
        }
    )
    return session, messages


async def test_a_pooled_session_is_a_fresh_session(pool_server):
    worker, working = pool_server["worker"], pool_server["working_dir"]
    first, messages = await _start(worker, "first")
    assert "Using a warm kernel" not in messages  # nothing was warm yet
    await worker.execute(
        first,
        "import os\nsecret = 'first-session'\nos.environ['LEFT_BEHIND'] = '1'\n"
        "open('note.txt', 'w').write('first')",
    )
    await _warm(worker, 1)
    assert len(_kernels(working)) == 2  # the session's, and one warm
    second, messages = await _start(worker, "second")
    try:
        assert "Using a warm kernel" in messages
        info = await worker.get_session_info(second)
        result = await worker.execute(
            second,
            "import os, sys\n"
            "print(os.getcwd())\n"
            "print(sorted(os.listdir('.')))\n"
            "print('secret' in globals(), os.environ.get('LEFT_BEHIND'))\n"
            "print(os.environ['HYPHA_WORKSPACE'], os.environ['HOME'])\n"
            "print(sys.path)",
        )
        cwd, listing, leaked, variables, path = _stdout(result).splitlines()
        assert cwd == info["working_dir"] != (await worker.get_session_info(first))["working_dir"]
        assert listing == "[]"
        assert leaked == "False None"
        workspace, home = variables.split()
        assert workspace == "ws-pool" and Path(home).parent == Path(cwd).parent
        # sys.path as in the fresh first session, but for its own instance folder.
        fresh = await worker.execute(first, "import sys; print(sys.path)")
        first_root = str(Path((await worker.get_session_info(first))["working_dir"]).parent)
        assert path == _stdout(fresh).strip().replace(first_root, str(Path(cwd).parent))
        assert info["isolation"] == (await worker.get_session_info(first))["isolation"]
        # Its first cell is cell 1: the pool and the set-up ran nothing visible.
        assert result["execution_count"] == 1
    finally:
        await worker.stop(second)
        await worker.stop(first)


async def test_concurrent_starts_never_share_a_kernel(pool_server):
    worker = pool_server["worker"]
    warm, _ = await _start(worker, "warmer")
    await worker.stop(warm)
    await _warm(worker, 1)
    ids = await asyncio.gather(*(_start(worker, f"twin-{i}") for i in range(3)))
    try:
        infos = [await worker.get_session_info(session) for session, _ in ids]
        assert len({info["kernel_pid"] for info in infos}) == 3
        assert len({info["working_dir"] for info in infos}) == 3
        assert sum("Using a warm kernel" in messages for _, messages in ids) <= 1
    finally:
        for session, _ in ids:
            await worker.stop(session)


async def test_the_pool_makes_room_for_sessions_and_counts_against_the_limit(pool_server):
    worker, working = pool_server["worker"], pool_server["working_dir"]
    sessions = []
    try:
        for i in range(3):  # CONDA_MAX_SESSIONS=3: warm kernels give way to sessions
            sessions.append((await _start(worker, f"full-{i}"))[0])
        await asyncio.sleep(2)
        assert len(_kernels(working)) == 3  # no warm kernel beyond the limit
        with pytest.raises(Exception, match="CONDA_MAX_SESSIONS=3"):
            await worker.start({"id": "one-too-many", "manifest": MANIFEST})
    finally:
        for session in sessions:
            await worker.stop(session)


async def test_stop_and_shutdown_leave_no_warm_kernel(offline_channel, tmp_path):
    """In-process worker, so its shutdown can be driven and watched directly."""
    from hypha_conda_plugin.settings import Settings
    from hypha_conda_plugin.worker import CondaWorker

    worker = CondaWorker(
        Settings(
            cache_dir=tmp_path / "cache",
            working_dir=tmp_path / "work",
            channel_alias=offline_channel.alias_url,
            kernel_pool_size=2,
        )
    )
    caller = {"ws": "ws-x", "user": {"id": "x"}}
    session = await worker.start({"manifest": MANIFEST}, context=caller)
    await _wait_for(lambda: len(_kernels(tmp_path / "work")) == 3)
    await worker.stop(session, context=caller)
    assert len(_kernels(tmp_path / "work")) == 2  # the session's kernel went, warm stay
    await worker.close()
    await _wait_for(lambda: not _kernels(tmp_path / "work"), within=10)
    assert not [p for p in (tmp_path / "work").iterdir() if p.name.startswith("r-")]
    assert os.listdir(tmp_path / "work") == []


async def test_warm_kernels_let_go_of_an_environment_the_cache_evicts(offline_channel, tmp_path):
    """In-process worker with room for one environment: the warm kernels of the first
    environment hold it (a lease) until the cache, building the second, asks them to
    let go; then it is evicted."""
    from hypha_conda_plugin.settings import Settings
    from hypha_conda_plugin.worker import CondaWorker

    worker = CondaWorker(
        Settings(
            cache_dir=tmp_path / "cache",
            working_dir=tmp_path / "work",
            channel_alias=offline_channel.alias_url,
            kernel_pool_size=1,
            cache_max_envs=1,
        )
    )
    caller = {"ws": "ws-x", "user": {"id": "x"}}
    try:
        first = await worker.start({"manifest": MANIFEST}, context=caller)
        first_env = Path((await worker.get_session_info(first, context=caller))["environment"])
        await worker.stop(first, context=caller)
        await _wait_for(lambda: worker.pool.ready_counts() == {first_env.name: 1})
        second = await worker.start(
            {"manifest": {"dependencies": ["python", "numpy"]}}, context=caller
        )
        await _wait_for(lambda: not first_env.exists(), within=30)
        assert first_env.name not in worker.pool.ready_counts()
        result = await worker.execute(second, "import numpy; print('ok')", context=caller)
        assert result["status"] == "ok"
    finally:
        await worker.close()
