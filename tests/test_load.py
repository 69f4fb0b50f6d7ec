"""get_load(): the number Hypha's `select:min:get_load` placement compares.

Sessions here are registry records in the states a real session passes through (no
kernels needed to count them); the end-to-end placement over three workers is in
test_standalone_workers.py.
"""

from __future__ import annotations

import pytest

from hypha_conda_plugin.errors import WorkspaceNotAuthorizedError
from hypha_conda_plugin.load import memory_used_fraction, worker_load
from hypha_conda_plugin.sessions import SessionManager, SessionState
from hypha_conda_plugin.settings import Settings
from hypha_conda_plugin.worker import CondaWorker


def test_memory_share_is_a_fraction_below_one_session():
    fraction = memory_used_fraction()
    assert 0 < fraction < 1  # this machine uses some memory, and never a whole session's worth


def test_load_counts_sessions_starts_and_running_cells(tmp_path):
    manager = SessionManager(tmp_path, 100)
    idle = worker_load(manager.list())
    assert 0 <= idle < 1

    ready = manager.create("ws", "ready", None)
    ready.state = SessionState.READY
    assert int(worker_load(manager.list())) == 1

    manager.create("ws", "starting", None)  # building its environment: counts double
    assert int(worker_load(manager.list())) == 3

    busy = manager.create("ws", "busy", None)
    busy.state, busy.running = SessionState.BUSY, 2
    assert int(worker_load(manager.list())) == 3 + 1 + 2

    for name in ("failed", "stopped"):
        gone = manager.create("ws", name, None)
        gone.state = SessionState.FAILED if name == "failed" else SessionState.STOPPED
    assert int(worker_load(manager.list())) == 6, "finished sessions weigh nothing"


async def test_get_load_is_refused_to_workspaces_the_worker_does_not_serve(tmp_path):
    worker = CondaWorker(
        Settings(cache_dir=tmp_path / "c", working_dir=tmp_path / "w", workspace="ws-a")
    )
    assert 0 <= await worker.get_load(context={"ws": "ws-a", "user": {"id": "u"}}) < 1
    server = {"ws": "public", "user": {"id": "root"}}  # Hypha's app controller
    assert 0 <= await worker.get_load(context=server) < 1
    with pytest.raises(WorkspaceNotAuthorizedError):
        await worker.get_load(context={"ws": "ws-b", "user": {"id": "u"}})
