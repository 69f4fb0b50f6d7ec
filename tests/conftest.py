"""Shared fixtures: the offline channel, real environments, real servers.

Nothing here is mocked. The offline channel (this interpreter + PyPI wheels converted to
conda packages) is cached under ``.cache/`` in the repository so warm runs reuse it;
servers, environments and sessions are fresh for every run.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hypha_conda_plugin.channel import ChannelBuildResult, build_channel
from hypha_conda_plugin.local_server import LocalServer

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("HYPHA_CONDA_TEST_CACHE", REPO / ".cache"))

# What the end-to-end tests need besides ipykernel and hypha-rpc (always included).
CHANNEL_REQUIREMENTS = ["numpy", "pandas"]
WALKTHROUGH_DEPENDENCIES = ["python", "numpy", "pandas"]


@pytest.fixture(scope="session")
def offline_channel() -> ChannelBuildResult:
    """A conda channel built from PyPI wheels and this interpreter (cached between runs)."""
    return build_channel(CACHE / "offline-channel", CHANNEL_REQUIREMENTS)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hcp")


@pytest.fixture(scope="session")
async def kernel_python(offline_channel: ChannelBuildResult, session_tmp: Path) -> Path:
    """The python of a real conda environment (python + ipykernel) built by our builder."""
    from hypha_conda_plugin.envs.spec import EnvSpec
    from hypha_conda_plugin.settings import Settings
    from hypha_conda_plugin.worker import CondaWorker

    settings = Settings(
        cache_dir=session_tmp / "kernel-env-cache",
        working_dir=session_tmp / "unused",
        channel_alias=offline_channel.alias_url,
    )
    worker = CondaWorker(settings)

    async def quiet(_: dict) -> None:
        return None

    env = await worker.envs.acquire(EnvSpec.from_manifest({"dependencies": []}), quiet)
    return env.python


def env_folders(worker_dirs: dict[str, Path]) -> set[str]:
    """Names of the environment folders in the worker's cache (none before the first);
    the cache's own dot-folders (lock files, trash) are not environments."""
    envs = worker_dirs["cache"] / "envs"
    if not envs.exists():
        return set()
    return {p.name for p in envs.iterdir() if p.is_dir() and not p.name.startswith(".")}


@pytest.fixture(scope="session")
def worker_dirs(session_tmp: Path) -> dict[str, Path]:
    return {"working": session_tmp / "sessions", "cache": session_tmp / "worker-cache"}


@pytest.fixture(scope="session")
async def hypha_server(
    offline_channel: ChannelBuildResult, session_tmp: Path, worker_dirs: dict[str, Path]
) -> AsyncIterator[LocalServer]:
    """A real Hypha server (subprocess) with our startup function, S3 and server apps."""
    server = LocalServer(
        session_tmp / "server",
        plugin_env={
            "CONDA_CHANNEL_ALIAS": offline_channel.alias_url,
            "CONDA_WORKING_DIR": str(worker_dirs["working"]),
            "CONDA_CACHE_DIR": str(worker_dirs["cache"]),
            # A canary: secrets in the server's environment must never reach user code.
            "DATABASE_PASSWORD": "canary-secret",
            # Tests start many sessions at once in one workspace (the quotas have tests
            # of their own, on servers of their own).
            "CONDA_MAX_SESSIONS": "100",
            "CONDA_MAX_SESSIONS_PER_WORKSPACE": "50",
            # One line per HTTP request, so tests can count what the worker asked for.
            "HYPHA_ACCESS_LOG": "true",
        },
    )
    async with server:
        yield server


def worker_server(
    folder: Path, channel: ChannelBuildResult, *, s3: bool = False, **settings: str
) -> LocalServer:
    """A Hypha server of a test's own, with our worker configured by ``settings``
    (``CONDA_*`` variables) on its own working and cache folders under ``folder``; no S3
    or server apps unless asked, so it starts in a second or two."""
    return LocalServer(
        folder / "server",
        s3=s3,
        server_apps=s3,
        plugin_env={
            "CONDA_CHANNEL_ALIAS": channel.alias_url,
            "CONDA_WORKING_DIR": str(folder / "sessions"),
            "CONDA_CACHE_DIR": str(folder / "cache"),
            **settings,
        },
    )


async def _connect(server: LocalServer, workspace: str):
    from hypha_rpc import connect_to_server

    token = await server.user_token(workspace)
    return await connect_to_server(
        {"server_url": server.url, "workspace": workspace, "token": token}
    )


@pytest.fixture(scope="session")
async def client(hypha_server: LocalServer) -> AsyncIterator:
    """A user connected to their own persistent workspace over websockets."""
    api = await _connect(hypha_server, "alice-ws")
    yield api
    await api.disconnect()


@pytest.fixture(scope="session")
async def other_client(hypha_server: LocalServer) -> AsyncIterator:
    """A second user in another workspace, for isolation tests."""
    api = await _connect(hypha_server, "bob-ws")
    yield api
    await api.disconnect()


@pytest.fixture(scope="session")
async def conda_worker(client):
    return await client.get_service("public/conda-worker")


@pytest.fixture(scope="session")
async def ready_session(conda_worker) -> AsyncIterator[str]:
    """One walkthrough session shared by tests that only run cells in it."""
    session_id = await conda_worker.start(
        {
            "id": "shared-session",
            "manifest": {"dependencies": WALKTHROUGH_DEPENDENCIES, "channels": ["conda-forge"]},
        }
    )
    yield session_id
    try:
        await conda_worker.stop(session_id)
    except Exception:
        pass  # a test may have stopped it already
