"""Concurrent and interrupted starts: one build per environment, nothing orphaned."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.conftest import env_folders


def _kernel_processes_in(folder: Path) -> list[int]:
    """Pids of ipykernel processes whose working directory lies under ``folder``."""
    return [pid for pid, _ in _kernels_in(folder)]


def _kernels_in(folder: Path) -> list[tuple[int, bytes]]:
    """(pid, command line) of ipykernel processes whose working directory lies under
    ``folder`` (with the sandbox, the bwrap process that holds the kernel)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if b"connection.json" in cmdline and cwd.is_relative_to(folder):
            pids.append((int(entry.name), cmdline))
    return pids


async def test_concurrent_starts_of_a_new_environment_build_it_once(conda_worker):
    # A spec no other test uses, so the first start must build it.
    manifest = {"dependencies": ["python", "numpy", "ipykernel"], "channels": ["conda-forge"]}
    logs: dict[str, list[str]] = {"a": [], "b": []}

    def recorder(name: str):
        return lambda message: logs[name].append(message["message"])

    ids = await asyncio.gather(
        conda_worker.start(
            {"id": "twin-a", "manifest": manifest, "progress_callback": recorder("a")}
        ),
        conda_worker.start(
            {"id": "twin-b", "manifest": manifest, "progress_callback": recorder("b")}
        ),
    )
    try:
        built = [n for n, msgs in logs.items() if any("Building environment" in m for m in msgs)]
        reused = [n for n, msgs in logs.items() if any("Reusing cached" in m for m in msgs)]
        assert len(built) == 1 and len(reused) == 1, logs
        infos = [await conda_worker.get_session_info(i) for i in ids]
        assert infos[0]["environment"] == infos[1]["environment"]
        for session_id in ids:
            result = await conda_worker.execute(
                session_id, "import numpy; print(numpy.ones(2).sum())"
            )
            assert result["outputs"][0]["text"] == "2.0\n"
    finally:
        for session_id in ids:
            await conda_worker.stop(session_id)


async def test_stop_during_a_build_cancels_it_and_leaves_nothing(conda_worker, worker_dirs):
    manifest = {"dependencies": ["python", "pandas"], "channels": ["conda-forge"]}
    building = asyncio.Event()

    def on_progress(message: dict) -> None:
        if message.get("stage", "").startswith("build:"):
            building.set()

    before = env_folders(worker_dirs)
    start = asyncio.ensure_future(  # a remote call returns a Future
        conda_worker.start(
            {"id": "stopped-early", "manifest": manifest, "progress_callback": on_progress}
        )
    )
    await asyncio.wait_for(building.wait(), 60)
    await conda_worker.stop("stopped-early")

    with pytest.raises(Exception, match="stopped while starting"):
        await start
    # The half-built environment is gone, and so is the session.
    assert env_folders(worker_dirs) == before
    assert "stopped-early" not in [s["session_id"] for s in await conda_worker.list_sessions()]
    # A start that went on regardless would have launched a kernel in the new
    # environment within a second or two: wait, then make sure none runs in any
    # environment but those that existed before (warm kernels of those may come and go).
    await asyncio.sleep(3)
    stray = [
        pid
        for pid, cmdline in _kernels_in(worker_dirs["working"])
        if not any(f"/envs/{key}/".encode() in cmdline for key in before)
    ]
    assert stray == []


async def test_worker_shutdown_during_a_start_leaves_no_kernel(offline_channel, tmp_path):
    """In-process worker (shutdown is the server's call): a start in flight is cancelled."""
    from hypha_conda_plugin.settings import Settings
    from hypha_conda_plugin.worker import CondaWorker

    worker = CondaWorker(
        Settings(
            cache_dir=tmp_path / "cache",
            working_dir=tmp_path / "work",
            channel_alias=offline_channel.alias_url,
        )
    )
    building = asyncio.Event()

    def on_progress(message: dict) -> None:
        if message.get("stage", "").startswith("build:"):
            building.set()

    caller = {"ws": "ws-a", "user": {"id": "alice"}}
    start = asyncio.create_task(
        worker.start(
            {
                "id": "late",
                "manifest": {"dependencies": ["python", "numpy"]},
                "progress_callback": on_progress,
            },
            context=caller,
        )
    )
    await asyncio.wait_for(building.wait(), 60)
    await worker.shutdown(context={"ws": "public", "user": {"id": "root"}})

    with pytest.raises(Exception, match="stopped while starting"):
        await start
    await asyncio.sleep(3)  # a start that went on would have its kernel by now
    assert _kernel_processes_in(tmp_path / "work") == []
    assert await worker.list_sessions(context=caller) == []
    assert env_folders({"cache": tmp_path / "cache"}) == set()
